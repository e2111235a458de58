"""KLMonitor: the numbers behind a KL term, in `fit`'s logs each epoch."""

import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from kl_keras import _checks
from kl_keras.layers import KLActivityRegularization, VariationalSampling
from kl_keras.regularizers import KLActivityRegularizer

__all__ = ["KLMonitor"]


def _layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model`, nested models included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def _regularized(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose activity regularizer is a (stateless) KLActivityRegularizer."""
    return [
        layer
        for layer in _layers(model)
        if isinstance(getattr(layer, "activity_regularizer", None), KLActivityRegularizer)
    ]


def _numpy(variable: Any) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(variable), "float64")


def _sparsity_logs(layer: KLActivityRegularization, dead_threshold: float) -> dict[str, float]:
    state = layer.statistics()
    if state["activation_count"] == 0:
        return {}
    rho_hat = np.atleast_1d(state["activation_sum"] / state["activation_count"])
    return {
        "rho_hat": float(rho_hat.mean()),
        "rho_hat_min": float(rho_hat.min()),
        "rho_hat_max": float(rho_hat.max()),
        "dead_units": float(np.mean(rho_hat < dead_threshold)),
        "penalty": float(state["penalty_sum"] / state["batch_count"]),
    }


def _latent_logs(layer: VariationalSampling, active_threshold: float) -> dict[str, float]:
    state = layer.statistics()
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


class KLMonitor(keras.callbacks.Callback):
    """Adds the statistics of every KL term in the model to `fit`'s logs each epoch.

    With no other setup it finds the model's `kl_keras.KLActivityRegularization`
    and `kl_keras.VariationalSampling` layers (nested models included) and
    adds, for each, keys named after the layer, so they appear in the progress
    bar's epoch line, `History`, `CSVLogger` and `TensorBoard` (place the
    monitor before those two in `callbacks=`):

    - sparsity (`KLActivityRegularization` named `code`): `code_rho_hat`,
      `code_rho_hat_min`, `code_rho_hat_max`, the mean, min and max over the
      units of ρ̂_j, each unit's mean activation over all of the epoch's
      activations (every batch weighted by its size); `code_dead_units`, the
      fraction of units with ρ̂_j < `dead_threshold`; `code_penalty`, the mean
      of the per-batch penalties that reached the loss; `code_beta`.
    - latents (`VariationalSampling` named `z`): `z_kl`, the mean per-sample
      KL(q ‖ p) in nats; `z_kl_min`, `z_kl_max`, the smallest and largest
      per-dimension mean KL; `z_active_units`, the number of dimensions j with
      Cov_x(E_q[z_j]) > `active_threshold` (Burda et al., "Importance
      Weighted Autoencoders", 2016; the variance over the epoch's samples of
      the posterior mean); `z_beta`.

    The same keys with a `val_` prefix (β excepted) describe the validation
    data, when `fit` has some. A `KLActivityRegularizer` holds no state (a
    regularizer's variables do not reach JAX's compiled step), so for the
    layers that carry one the monitor reports `<layer>_beta` only and warns
    once: use a `KLActivityRegularization` layer after the activation to see
    ρ̂.

    The statistics accumulate in the layers' non-trainable variables, updated
    inside the compiled training and evaluation steps on TensorFlow, JAX and
    PyTorch; the monitor resets them when an epoch (or its validation) begins
    and reads them when it ends. Between those, it computes nothing.

    Args:
        dead_threshold: a unit whose ρ̂_j over the epoch is below this is dead,
            a float in [0, 1).
        active_threshold: a latent dimension whose posterior mean varies more
            than this across the samples is active, a float >= 0.
    """

    def __init__(self, dead_threshold: float = 1e-3, active_threshold: float = 0.01) -> None:
        super().__init__()
        self.dead_threshold = _checks.check_real(
            "dead_threshold", dead_threshold, "a float in [0, 1)", lambda v: 0.0 <= v < 1.0
        )
        self.active_threshold = _checks.check_weight("active_threshold", active_threshold)
        self._training_logs: dict[str, float] | None = None
        self._validation_logs: dict[str, float] | None = None
        self._fitting = False

    def _monitored(self) -> Iterator[tuple[keras.layers.Layer, str]]:
        for layer in _layers(self.model):
            if isinstance(layer, KLActivityRegularization):
                yield layer, "sparsity"
            elif isinstance(layer, VariationalSampling):
                yield layer, "latent"

    def _read(self) -> dict[str, float]:
        logs = {}
        for layer, kind in self._monitored():
            if not layer.built:
                continue
            if kind == "sparsity":
                values = _sparsity_logs(layer, self.dead_threshold)
            else:
                values = _latent_logs(layer, self.active_threshold)
            logs.update({f"{layer.name}_{key}": value for key, value in values.items()})
        return logs

    def _reset(self) -> None:
        for layer, _ in self._monitored():
            if layer.built:
                layer.reset_statistics()

    def _betas(self) -> dict[str, float]:
        logs = {}
        for layer, _ in self._monitored():
            if layer.built:
                logs[f"{layer.name}_beta"] = float(_numpy(layer.current_beta))
        for layer in _regularized(self.model):
            logs[f"{layer.name}_beta"] = layer.activity_regularizer.beta
        return logs

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._fitting = True
        stateless = [layer.name for layer in _regularized(self.model)]
        if stateless:
            warnings.warn(
                f"KLMonitor: the layers {stateless} carry a KLActivityRegularizer, which "
                "holds no state; only their beta is logged. To see rho_hat and dead units, "
                "put a kl_keras.KLActivityRegularization layer after the activation instead.",
                stacklevel=2,
            )

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._fitting = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._training_logs = None
        self._validation_logs = None
        self._reset()

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self._fitting:  # validation inside fit: keep the training epoch's numbers
            self._training_logs = self._read()
            self._reset()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._fitting:
            self._validation_logs = self._read()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        training = self._training_logs if self._training_logs is not None else self._read()
        logs.update(training)
        logs.update(self._betas())
        if self._validation_logs:
            logs.update({f"val_{key}": value for key, value in self._validation_logs.items()})
