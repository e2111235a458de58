"""Keras losses for the Kullback-Leibler divergence KL(y_true ‖ y_pred)."""

import keras
from keras import ops

from kl_keras import _checks
from kl_keras.divergence import computation_dtype, kl_from_logits, kl_from_probabilities


@keras.saving.register_keras_serializable(package="kl_keras")
def kl_divergence(y_true, y_pred, from_logits=False, axis=-1):
    """Kullback-Leibler divergence KL(y_true ‖ y_pred) along `axis`.

    The direction is the one of `keras.losses.kl_divergence`: `y_true` is the
    reference distribution P, `y_pred` the model's Q, and the loss is
    `KL(P ‖ Q)`.

    ```python
    # from_logits=False: y_pred holds probabilities
    loss = sum(y_true * log(y_true / y_pred), axis=axis)
    # from_logits=True: y_pred holds logits
    loss = sum(y_true * (log(y_true) - log_softmax(y_pred, axis)), axis=axis)
    ```

    Numerical conventions:

    - Entries with `y_true == 0` contribute exactly 0 (`0 * log(0) = 0`) and
      have finite gradients; `y_true` is never clipped. KL(p ‖ p) is exactly 0
      for one-hot `p`.
    - Probabilities in `y_pred` are floored at `keras.config.epsilon()`
      (`1e-7`), so a zero where `y_true > 0` gives a large finite loss; the
      gradient, `-y_true / max(y_pred, epsilon)`, never becomes 0. Negative or
      NaN probabilities give NaN. For `y_pred >= epsilon` and `y_true > 0` the
      values equal those of `keras.losses.kl_divergence`.
    - With `from_logits=True` nothing is clipped: every finite logit gives a
      finite value, a logit of `-inf` is allowed where `y_true == 0`, and the
      gradient with respect to the logits is `softmax(y_pred) * sum(y_true) -
      y_true`.
    - float16 and bfloat16 inputs are computed in float32 and the result is
      cast back to the dtype of `y_pred`.

    Args:
        y_true: target probabilities.
        y_pred: predicted probabilities, or logits if `from_logits=True`;
            broadcastable against `y_true`. `y_true` is cast to its dtype.
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.

    Returns:
        The divergence for each distribution: the broadcast shape of the
        inputs with `axis` removed, e.g. `(batch,)` for `(batch, classes)`.

    Example:

    >>> import numpy as np
    >>> y_true = np.array([[0.0, 1.0], [0.5, 0.5]])
    >>> y_pred = np.array([[0.4, 0.6], [0.5, 0.5]])
    >>> loss = kl_divergence(y_true, y_pred)
    >>> tuple(loss.shape)
    (2,)
    >>> [round(float(v), 4) for v in loss]
    [0.5108, 0.0]
    """
    from_logits = _checks.check_bool("from_logits", from_logits)
    axis = _checks.check_axis(axis)
    y_pred = ops.convert_to_tensor(y_pred)
    input_dtype = keras.backend.standardize_dtype(y_pred.dtype)
    dtype = computation_dtype(input_dtype)
    result_dtype = input_dtype if keras.backend.is_float_dtype(input_dtype) else dtype
    y_pred = ops.cast(y_pred, dtype)
    y_true = ops.cast(ops.convert_to_tensor(y_true), dtype)
    _checks.check_distribution_shapes(y_true.shape, y_pred.shape, axis)
    if from_logits:
        loss = kl_from_logits(y_true, y_pred, axis=axis)
    else:
        loss = kl_from_probabilities(y_true, y_pred, axis=axis)
    return ops.cast(loss, result_dtype)


kld = kl_divergence


@keras.saving.register_keras_serializable(package="kl_keras")
class KLDivergence(keras.losses.Loss):
    """Kullback-Leibler divergence loss KL(y_true ‖ y_pred).

    A replacement for `keras.losses.KLDivergence` in `compile` that is exact
    where `y_true` has zeros, accepts logits, and lets you choose the axis.
    It is not a drop-in replacement inside
    `keras.distillation.LogitsDistillation`, which passes raw teacher logits as
    `y_true` (they are not probabilities, and the value is NaN):

    ```python
    loss = sum(y_true * log(y_true / y_pred), axis=axis)
    ```

    See `kl_keras.kl_divergence` for the numerical conventions. Reduction,
    `sample_weight` and Keras masks are handled by `keras.losses.Loss`
    exactly as for the built-in losses. To match
    `torch.nn.functional.kl_div(..., reduction="batchmean")` use the default
    `reduction="sum_over_batch_size"` on inputs of shape `(batch, classes)`.

    Args:
        from_logits: whether `y_pred` holds logits along `axis` (computed
            through log-softmax, never clipped) rather than probabilities.
        axis: the axis along which the distributions lie.
        reduction: one of `"sum_over_batch_size"`, `"sum"`, `"mean"`,
            `"mean_with_sample_weight"`, `"none"` or `None`, as in Keras.
        name: name of the loss instance.
        dtype: dtype of the loss's computations, as in Keras losses; `None`
            means `keras.config.floatx()`. float16 and bfloat16 are computed
            in float32 internally.

    Example:

    >>> import numpy as np
    >>> loss = KLDivergence(from_logits=True)
    >>> y_true = np.array([[1.0, 0.0, 0.0]])
    >>> logits = np.array([[-20.0, 20.0, 0.0]])
    >>> round(float(loss(y_true, logits)), 3)
    40.0
    """

    def __init__(
        self,
        from_logits=False,
        axis=-1,
        reduction="sum_over_batch_size",
        name="kl_divergence",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _checks.check_bool("from_logits", from_logits)
        self.axis = _checks.check_axis(axis)
        self._dtype_argument = None if dtype is None else self._dtype_policy.name

    def call(self, y_true, y_pred):
        return kl_divergence(y_true, y_pred, from_logits=self.from_logits, axis=self.axis)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "from_logits": self.from_logits,
                "axis": self.axis,
                "dtype": self._dtype_argument,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        _checks.check_config(cls, config)
        return cls(**config)
