"""Keras layers that add a KL term to the model's losses; the only objects here with state.

Under JAX, Keras compiles the training step as a pure function of the model's
variables: a `keras.Variable` held by a loss or a regularizer is read once, when
the step is traced, and never again. A layer's variables are arguments of the
step, so a step counter and a β schedule that live in the layer advance inside
the compiled step, identically on TensorFlow, JAX and PyTorch.
"""

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops

from kl_keras import _checks
from kl_keras._distribute import global_sum_and_count
from kl_keras._types import Config, Tensor
from kl_keras.divergence import computation_dtype, gaussian_kl, sparsity_penalty


def sparsity_logs(rho_hat: Any, penalty: float, dead_threshold: float) -> dict[str, float]:
    """The sparsity keys of `KLMonitor` from the mean activations ρ̂_j of the units.

    `rho_hat`, `rho_hat_min`, `rho_hat_max`: the mean, min and max of ρ̂ over the units;
    `dead_units`: the fraction of units with ρ̂_j < `dead_threshold`; `penalty` as given.
    """
    rho_hat = np.atleast_1d(np.asarray(rho_hat, "float64"))
    return {
        "rho_hat": float(rho_hat.mean()),
        "rho_hat_min": float(rho_hat.min()),
        "rho_hat_max": float(rho_hat.max()),
        "dead_units": float(np.mean(rho_hat < dead_threshold)),
        "penalty": float(penalty),
    }


def _check_beta_or_schedule(
    value: Any,
) -> "float | keras.optimizers.schedules.LearningRateSchedule":
    """`beta` of a layer: a float >= 0, or any Keras `LearningRateSchedule`."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, dict):  # a serialized schedule, from `get_config`
        return _check_beta_or_schedule(keras.saving.deserialize_keras_object(value))
    return _checks.check_real(
        "beta",
        value,
        "a finite float >= 0 or a keras.optimizers.schedules.LearningRateSchedule",
        lambda v: 0.0 <= v < float("inf"),
    )


class _StatefulKLLayer(keras.layers.Layer):
    """A layer that adds a weighted KL term and keeps the state around it.

    Its `beta` may follow a schedule of its own training steps: it owns two
    non-trainable variables, `step`, the number of training calls so far, and
    `current_beta`, the β of the latest training call (the initial β before
    the first). A training call uses `schedule(step)` and then advances `step`;
    other calls use the stored β. Both are saved with the model.

    It also accumulates statistics for `kl_keras.callbacks.KLMonitor` in a
    float32 non-trainable variable (`statistics()` reads it), updated by the
    calls that `fit`, `evaluate` and `predict` make (an explicit `training`
    argument), so they advance inside the compiled step on every backend. The
    monitor resets and reads them between steps; they are not saved.
    """

    def __init__(
        self, beta: float | keras.optimizers.schedules.LearningRateSchedule, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.beta: Any = _check_beta_or_schedule(beta)

    def _build_schedule_state(self) -> None:
        scheduled = isinstance(self.beta, keras.optimizers.schedules.LearningRateSchedule)
        initial = float(ops.convert_to_numpy(self.beta(0))) if scheduled else self.beta
        # "only_first_replica": every replica of a tf.distribute strategy computes the
        # same update, which the first one writes (as Keras's optimizer iterations).
        self.step = self.add_weight(
            shape=(),
            dtype="int",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            name="step",
        )
        self.current_beta = self.add_weight(
            shape=(),
            dtype="float32",
            initializer=keras.initializers.Constant(initial),
            trainable=False,
            aggregation="only_first_replica",
            autocast=False,  # float32 also under mixed precision
            name="beta",
        )

    def _build_statistics(self, layout: tuple[tuple[str, tuple[int, ...]], ...]) -> None:
        """One float32 variable for every statistic; `layout` is ((name, shape), ...).

        One variable, not one per statistic, updated by one short sequence of ops:
        each variable is an input and an output of JAX's compiled step, and in
        PyTorch's eager mode every op has a fixed cost.
        """
        self._statistics_layout = tuple((name, tuple(shape)) for name, shape in layout)
        size = sum(math.prod(shape) for _, shape in self._statistics_layout)
        # Updated from globally reduced values, identical on every replica.
        self.statistics_state = self.add_weight(
            shape=(size,),
            dtype="float32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
            autocast=False,  # float32 also under mixed precision
            name="statistics",
        )

    def _parts(self, flat: Any, reshape: Callable[[Any, tuple[int, ...]], Any]) -> dict[str, Any]:
        """The statistics in `flat` (laid out as `_build_statistics` says) by name, each
        given to `reshape` with its shape."""
        parts, offset = {}, 0
        for name, shape in self._statistics_layout:
            size = math.prod(shape)
            parts[name] = reshape(flat[offset : offset + size], shape)
            offset += size
        return parts

    def _packed(self, parts: dict[str, Any]) -> Tensor:
        """The statistics `parts` (by name, any shape holding the layout's size) laid out flat
        in float32, out of every derivative: the inverse of `_parts`."""
        flat = [
            ops.reshape(ops.cast(parts[name], "float32"), (-1,))
            for name, _ in self._statistics_layout
        ]
        return ops.stop_gradient(ops.concatenate(flat, axis=0))

    def statistics(self) -> dict[str, Any]:
        """The statistics accumulated since the last reset, as numpy arrays by name."""
        flat = np.asarray(ops.convert_to_numpy(self.statistics_state), "float64")
        return self._parts(flat, np.reshape)

    def reset_statistics(self) -> None:
        self.statistics_state.assign(ops.zeros(self.statistics_state.shape, "float32"))

    def monitor_logs(self, dead_threshold: float, active_threshold: float) -> dict[str, float]:
        """What `kl_keras.callbacks.KLMonitor` logs for this layer, from `statistics()`,
        keyed without the layer's name; empty when nothing was accumulated."""
        raise NotImplementedError

    def _weight(self, training: bool | None) -> Tensor:
        """β for this call, advancing the schedule in training calls."""
        if not isinstance(self.beta, keras.optimizers.schedules.LearningRateSchedule):
            return ops.convert_to_tensor(self.beta, "float32")
        if not training:
            return ops.convert_to_tensor(self.current_beta)
        beta = ops.cast(self.beta(self.step), "float32")
        self.current_beta.assign(beta)
        self.step.assign_add(ops.ones((), self.step.dtype))
        return beta

    def save_own_variables(self, store: Any) -> None:
        # The step and β only: the statistics are per epoch, reset by KLMonitor.
        store["0"] = self.step
        store["1"] = self.current_beta

    def load_own_variables(self, store: Any) -> None:
        if len(store.keys()) != 2:
            raise ValueError(
                f"Layer '{self.name}' expected 2 saved variables (step, beta), "
                f"received {len(store.keys())}."
            )
        self.step.assign(store["0"])
        self.current_beta.assign(store["1"])

    def get_config(self) -> Config:
        config = super().get_config()
        beta = self.beta
        if isinstance(beta, keras.optimizers.schedules.LearningRateSchedule):
            beta = keras.saving.serialize_keras_object(beta)
        config.update({"beta": beta})
        return config


@keras.saving.register_keras_serializable(package="kl_keras")
class VariationalSampling(_StatefulKLLayer):
    """Samples a VAE's latent code and adds β·KL(q ‖ p) to the model's losses.

    Called on `[mean, log_var]` (a standard-normal prior) or on `[mean,
    log_var, prior_mean, prior_log_var]` (a learned or conditional prior), it
    returns the reparameterised sample (Kingma & Welling, "Auto-Encoding
    Variational Bayes", 2014)

    ```python
    z = mean + exp(log_var / 2) * epsilon       # epsilon ~ N(0, I), training
    z = mean                                    # otherwise
    loss = beta * sum(max(mean_over_batch(kl), free_bits))   # added with add_loss
    ```

    where `kl` is `gaussian_kl_divergence` per latent dimension (every axis but
    the first). Without free bits the added loss is β times the batch mean of
    the per-sample KL, so it means the same at every batch size. Under
    `tf.distribute` the batch mean is over the global batch (an all-reduce
    across replicas), as under JAX's `keras.distribution`. The KL is added in
    every call, also when not training, so `val_loss` and `evaluate` measure
    the same objective as `loss` (with the β of the latest training step).

    Free bits (Kingma et al., "Improved Variational Inference with Inverse
    Autoregressive Flow", 2016): with `free_bits = λ > 0` each latent
    dimension's batch-mean KL is floored at λ nats, so a dimension whose KL is
    below λ costs λ and gets no KL gradient; the encoder can use the first λ
    nats of every dimension for free.

    `beta` is a float or a schedule of the step: any
    `keras.optimizers.schedules.LearningRateSchedule`, such as
    `kl_keras.schedules.LinearWarmup` or `kl_keras.schedules.CyclicalAnnealing`.
    The layer counts its training calls in the non-trainable variable `step`
    (saved with the model, so training resumed after loading continues the
    schedule) and keeps the β in use in `current_beta`; the first training
    step uses `beta(0)`. Both advance inside the compiled step, on JAX too. A
    layer called twice in one step advances twice.

    The KL is computed in float32 for float16 / bfloat16 inputs (mixed
    precision) and `z` is returned in the layer's compute dtype.

    Args:
        beta: the weight of the KL term: a float >= 0, or a
            `LearningRateSchedule`.
        free_bits: the floor λ >= 0 of each dimension's batch-mean KL, in nats.
        seed: an int seed of the noise, or None.
        name: the layer's name.
        **kwargs: other `keras.layers.Layer` arguments (`dtype`, ...).

    Examples:
        >>> import numpy as np
        >>> layer = VariationalSampling(beta=1.0)
        >>> mean = np.array([[0.5, -1.0]], dtype="float32")
        >>> log_var = np.array([[0.2, -0.7]], dtype="float32")
        >>> z = layer([mean, log_var], training=True)
        >>> tuple(z.shape)
        (1, 2)
        >>> round(float(layer.losses[0]), 6)  # β times gaussian_kl_divergence
        0.733994
    """

    def __init__(
        self,
        beta: float | keras.optimizers.schedules.LearningRateSchedule = 1.0,
        free_bits: float = 0.0,
        seed: int | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(beta=beta, name=name, **kwargs)
        self.free_bits = _checks.check_weight("free_bits", free_bits)
        self.seed = seed  # checked by SeedGenerator: an int or None
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape: Any) -> None:
        shapes = input_shape if isinstance(input_shape, (list, tuple)) else [input_shape]
        if not (len(shapes) in (2, 4) and all(isinstance(s, (list, tuple)) for s in shapes)):
            raise ValueError(
                "VariationalSampling expects a list [mean, log_var] or [mean, log_var, "
                f"prior_mean, prior_log_var]. Received inputs of shapes: {input_shape}"
            )
        if tuple(shapes[0]) != tuple(shapes[1]):
            raise ValueError(
                "`mean` and `log_var` must have the same shape. Received: "
                f"mean.shape={tuple(shapes[0])}, log_var.shape={tuple(shapes[1])}"
            )
        self._build_schedule_state()
        latent_shape = tuple(shapes[0][1:])
        if None in latent_shape:
            raise ValueError(
                "VariationalSampling needs the latent shape (every axis but the batch) "
                f"when built. Received: mean.shape={tuple(shapes[0])}"
            )
        # Per epoch, for KLMonitor: the KL per dimension summed over the samples, and
        # the count, mean and sum of squared deviations of the posterior means.
        self._build_statistics(
            (
                ("kl_sum", latent_shape),
                ("mean_mean", latent_shape),
                ("mean_m2", latent_shape),
                ("sample_count", ()),
            )
        )
        self._latent_size = math.prod(latent_shape)

    def _accumulate(self, kl_total: Tensor, count: Tensor, mean: Tensor) -> None:
        """Adds one (global) batch to the epoch's statistics (Welford's merge).

        The posterior means are taken as deviations from the running mean m, so a
        variance that is small next to the mean keeps its digits: with n samples
        so far and S1, S2 the batch's sums of (mean - m) and (mean - m)², the new
        count is n' = n + batch, the new mean m + S1 / n', and the sum of squared
        deviations grows by S2 - S1² / n'.
        """
        size = self._latent_size
        state = self._parts(ops.convert_to_tensor(self.statistics_state), lambda part, shape: part)
        mean = ops.reshape(ops.cast(ops.stop_gradient(mean), "float32"), (-1, size))
        deviation = mean - state["mean_mean"]
        both = ops.concatenate([deviation, deviation * deviation], axis=1)
        sums, _ = global_sum_and_count(both, axis=(0,))
        combined = state["sample_count"] + ops.cast(ops.stop_gradient(count), "float32")
        shift = sums[:size] / ops.maximum(combined, 1.0)
        new = {
            "kl_sum": state["kl_sum"] + ops.reshape(ops.cast(kl_total, "float32"), (-1,)),
            "mean_mean": state["mean_mean"] + shift,
            "mean_m2": state["mean_m2"] + sums[size:] - sums[:size] * shift,
            "sample_count": combined,
        }
        self.statistics_state.assign(self._packed(new))

    def monitor_logs(self, dead_threshold: float, active_threshold: float) -> dict[str, float]:
        """`kl`, the mean per-sample KL; `kl_min`, `kl_max`, the extreme per-dimension mean
        KLs; `active_units`, the dimensions whose posterior mean varies more than
        `active_threshold` over the samples."""
        state = self.statistics()
        count = state["sample_count"]
        if count == 0:
            return {}
        kl_per_dimension = state["kl_sum"] / count
        return {
            "kl": float(kl_per_dimension.sum()),
            "kl_min": float(kl_per_dimension.min()),
            "kl_max": float(kl_per_dimension.max()),
            "active_units": int(np.sum(state["mean_m2"] / count > active_threshold)),
        }

    def call(self, inputs: Tensor, training: bool | None = None) -> Tensor:
        mean, log_var, *prior = inputs
        dtype = computation_dtype(mean.dtype)
        mean, log_var = ops.cast(mean, dtype), ops.cast(log_var, dtype)
        prior_mean, prior_log_var = (ops.cast(x, dtype) for x in prior) if prior else (0.0, 0.0)
        kl = gaussian_kl(mean, log_var, prior_mean, prior_log_var)
        total, count = global_sum_and_count(kl, axis=(0,))
        kl_per_dimension = total / ops.maximum(count, 1.0)  # an empty batch adds 0
        if self.free_bits > 0:
            # `where`, not `maximum`: NaN stays NaN, and the floor has no gradient.
            floored = kl_per_dimension < self.free_bits
            kl_per_dimension = ops.where(floored, self.free_bits, kl_per_dimension)
        self.add_loss(self._weight(training) * ops.sum(kl_per_dimension))
        if training is not None:
            self._accumulate(total, count, mean)
        if not training:
            return ops.cast(mean, self.compute_dtype)
        noise = keras.random.normal(ops.shape(mean), dtype=dtype, seed=self.seed_generator)
        return ops.cast(mean + ops.exp(0.5 * log_var) * noise, self.compute_dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return tuple(input_shape[0])

    def get_config(self) -> Config:
        config = super().get_config()
        config.update({"free_bits": self.free_bits, "seed": self.seed})
        return config


@keras.saving.register_keras_serializable(package="kl_keras")
class KLActivityRegularization(_StatefulKLLayer):
    """An identity layer that adds the sparsity penalty β·Σ_j KL(ρ ‖ ρ̂_j) of its input.

    The KL counterpart of `keras.layers.ActivityRegularization`: place it after
    an activation, and it adds the penalty of `KLActivityRegularizer` (the same
    math and conventions: both Bernoulli terms, ρ̂_j the mean over every axis
    but the last, over the global batch under `tf.distribute`, ρ̂ clipped to
    [ε, 1 - ε] with the gradient kept, half precision computed in float32) to
    the model's losses with `add_loss`:

    ```python
    rho_hat = mean(inputs, axis=every axis but the last)
    loss = beta * sum(rho * log(rho / rho_hat) + (1 - rho) * log((1 - rho) / (1 - rho_hat)))
    ```

    Unlike an `activity_regularizer`, nothing is divided by the batch size on
    any Keras version, so no compensation is involved, and a custom layer can
    call it directly. `beta` is a float or a schedule of the training step,
    exactly as in `VariationalSampling`: any
    `keras.optimizers.schedules.LearningRateSchedule` (for example
    `kl_keras.schedules.LinearWarmup` to anneal the penalty in), evaluated
    from the layer's own `step` variable inside the compiled training step, on
    JAX as on TensorFlow and PyTorch; the β in use is `current_beta`. The
    penalty is added in every call, also when not training.

    Masks pass through, and are used: after a layer that masks padded steps
    (`Embedding(mask_zero=True)`, `Masking`), ρ̂_j is the mean over the real
    positions only, so padding neither pulls ρ̂ toward its own activations nor
    changes with the amount of it.

    Args:
        rho: the target mean activation ρ, a float strictly between 0 and 1.
        beta: the weight of the penalty: a float >= 0, or a
            `LearningRateSchedule`.
        name: the layer's name.
        **kwargs: other `keras.layers.Layer` arguments (`dtype`, ...).

    Examples:
        >>> import numpy as np
        >>> layer = KLActivityRegularization(rho=0.05, beta=0.01)
        >>> activations = np.full((8, 4), 0.5, dtype="float32")  # 4 units, mean 0.5
        >>> outputs = layer(activations)
        >>> round(float(layer.losses[0]), 4)  # 0.01 * 4 * KL(0.05 ‖ 0.5)
        0.0198
    """

    def __init__(
        self,
        rho: float = 0.05,
        beta: float | keras.optimizers.schedules.LearningRateSchedule = 0.01,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(beta=beta, name=name, **kwargs)
        self.rho = _checks.check_rho(rho)
        self.supports_masking = True

    def build(self, input_shape: Any) -> None:
        self._build_schedule_state()
        units = input_shape[-1] if len(input_shape) > 1 else None
        if len(input_shape) > 1 and units is None:
            raise ValueError(
                "KLActivityRegularization needs the number of units (the last axis) "
                f"when built. Received: input_shape={tuple(input_shape)}"
            )
        # Per epoch, for KLMonitor: the activations summed per unit, the number of
        # entries in each sum, the penalties that reached the loss and the batches.
        self._build_statistics(
            (
                ("activation_sum", () if units is None else (units,)),
                ("activation_count", ()),
                ("penalty_sum", ()),
                ("batch_count", ()),
            )
        )

    def call(
        self, inputs: Tensor, training: bool | None = None, mask: Tensor | None = None
    ) -> Tensor:
        penalty, total, count = sparsity_penalty(inputs, self.rho, mask)
        weighted = self._weight(training) * penalty
        self.add_loss(weighted)
        if training is not None:
            parts = {
                "activation_sum": total,
                "activation_count": count,
                "penalty_sum": weighted,
                "batch_count": 1.0,
            }
            self.statistics_state.assign_add(self._packed(parts))
        return inputs

    def monitor_logs(self, dead_threshold: float, active_threshold: float) -> dict[str, float]:
        """The sparsity keys of `sparsity_logs`, `penalty` the mean per-batch penalty."""
        state = self.statistics()
        if state["activation_count"] == 0:
            return {}
        rho_hat = state["activation_sum"] / state["activation_count"]
        penalty = state["penalty_sum"] / state["batch_count"]
        return sparsity_logs(rho_hat, penalty, dead_threshold)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> Config:
        config = super().get_config()
        config.update({"rho": self.rho})
        return config
