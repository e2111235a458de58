"""Distillation from two sets of logits: a Keras loss and a `keras.distillation` loss."""

from typing import Any

import keras
from keras import ops

from kl_keras import _checks, _shell
from kl_keras import divergence as core
from kl_keras._types import Config, Tensor


@keras.saving.register_keras_serializable(package="kl_keras")
class LogitsDistillation(
    _shell.StrictConfig, keras.losses.Loss, keras.distillation.DistillationLoss
):
    """Distillation loss T²·D(softmax(teacher / T) ‖ softmax(student / T)) from two sets of logits.

    One object for both ways in. As a Keras loss, `y_true` holds the teacher's
    logits and `y_pred` the student's:
    `student.compile(loss=LogitsDistillation(temperature=4.0))`, then
    `student.fit(x, teacher_logits)`, with Keras's reductions, sample weights
    (one per token for sequences, so padding can be weighted out) and masks.
    As a `keras.distillation.DistillationLoss`:
    `keras.distillation.Distiller(teacher, student,
    distillation_losses=LogitsDistillation(temperature=4.0))`.

    ```python
    log_p = log_softmax(y_true / temperature, axis)   # the teacher, P
    log_q = log_softmax(y_pred / temperature, axis)   # the student, Q
    loss = temperature**2 * D(P ‖ Q)
    ```

    `divergence` picks D: `"kl"` (forward KL(P ‖ Q), Hinton et al. 2015),
    `"reverse_kl"` (KL(Q ‖ P)), `"jeffreys"` (their sum) or `"jensen_shannon"`
    ((1 − β)·KL(P ‖ M) + β·KL(Q ‖ M), M = β·P + (1 − β)·Q, continuous in β as
    in `kl_keras.jensen_shannon_divergence`). Both sides stay in log space:
    nothing is clipped and no probability is formed where a log is needed, and
    the two sets of logits meet in their centred difference, so the value is
    exact at any vocabulary size, also where the two distributions are close
    (a converged student: relative error below 2e-6 in float32 at KL of 1e-9,
    and unchanged by a constant added to either row; see the numerics guide).

    The T² factor keeps the gradient's scale independent of T: for `"kl"` the
    gradient with respect to the student's logits is
    `temperature * (softmax(y_pred / T) - softmax(y_true / T))` times the
    reduction's scale. TRL's `generalized_jsd_loss`, Liger-Kernel's `LigerJSD`
    and torchtune's KL losses apply no T²: a port from them changes the loss's
    scale by T². `keras.distillation.LogitsDistillation` applies T² only when its
    loss is a `keras.losses.KLDivergence` instance; its default
    `loss="kl_divergence"` clips the scaled logits as if they were
    probabilities and returns a wrong value with wrong gradients.

    Teacher logits of `-inf` (masked vocabulary entries) give finite values and
    gradients: the exact ones for `"kl"` and `"jensen_shannon"`; for
    `"reverse_kl"` and `"jeffreys"`, whose true value is infinite wherever the
    student puts mass on a masked entry, the teacher's log-probability of a
    masked entry is taken as `log(keras.config.epsilon())` (the floor of
    `kl_keras.reverse_kl_divergence`, in log space); every finite teacher logit
    keeps its own log-probability, however small. A NaN logit makes its
    distribution's value and gradients NaN.

    Args:
        temperature: T, a finite number > 0.
        divergence: one of `"kl"`, `"reverse_kl"`, `"jeffreys"`,
            `"jensen_shannon"`.
        beta: the weight of the teacher in the Jensen-Shannon mixture, in
            [0, 1]; used only by `"jensen_shannon"`.
        axis: the axis of the logits that holds the classes (vocabulary).
        reduction: as in Keras losses; `"sum_over_batch_size"` averages over
            every position (every token of a sequence).
        name: name of the loss instance.
        dtype: dtype of the loss's computations, as in Keras losses.
            float16 and bfloat16 are computed in float32 internally.

    Examples:
        >>> import numpy as np
        >>> teacher = np.array([[2.0, 1.0, -1.0]])
        >>> student = np.array([[0.5, 0.0, 0.2]])
        >>> loss = LogitsDistillation(temperature=2.0)
        >>> round(float(loss(teacher, student)), 5)
        0.47581
    """

    def __init__(
        self,
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "logits_distillation",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _checks.check_temperature(temperature)
        self.divergence = _checks.check_choice(
            "divergence", divergence, core.DISTILLATION_DIVERGENCES
        )
        self.beta = _checks.check_beta(beta)
        self.axis = _checks.check_axis(axis)
        # Keras's Loss.get_config leaves `dtype` out on some versions: kept here, as given.
        self._dtype_argument = None if dtype is None else self._dtype_policy.name

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return _shell.divergence(
            self.divergence, "logits", y_true, y_pred, self.axis, self.beta, self.temperature
        )

    def compute_loss(
        self, teacher_outputs: Tensor, student_outputs: Tensor, **kwargs: Any
    ) -> Tensor:
        """The loss summed over the outputs' structure (`keras.distillation` entry point)."""
        losses = keras.tree.flatten(
            keras.tree.map_structure(self, teacher_outputs, student_outputs)
        )
        return losses[0] if len(losses) == 1 else ops.sum(ops.stack(losses))

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            {
                "temperature": self.temperature,
                "divergence": self.divergence,
                "beta": self.beta,
                "axis": self.axis,
                "dtype": self._dtype_argument,
            }
        )
        return config
