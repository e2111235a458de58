"""KLMonitor: the numbers behind a KL term, in `fit`'s logs each epoch."""

import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from kl_keras import _checks
from kl_keras.layers import _StatefulKLLayer, sparsity_logs
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


def _regularizer_logs(
    layer: keras.layers.Layer, activations: np.ndarray, dead_threshold: float
) -> dict[str, float]:
    """The sparsity keys of one regularized layer, from its activations over given data."""
    regularizer = layer.activity_regularizer
    x = np.asarray(activations, "float64")
    rho_hat = np.atleast_1d(x.reshape(-1, x.shape[-1]).mean(axis=0) if x.ndim > 1 else x.mean())
    epsilon = keras.config.epsilon()
    clipped = np.clip(rho_hat, epsilon, 1.0 - epsilon)
    rho = regularizer.rho
    kl = rho * np.log(rho / clipped) + (1.0 - rho) * np.log((1.0 - rho) / (1.0 - clipped))
    return sparsity_logs(rho_hat, regularizer.beta * kl.sum(), dead_threshold)


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
    data, when `fit` has some.

    A layer that carries a `KLActivityRegularizer` (`Dense(...,
    activity_regularizer=...)`) holds no state of its own (a regularizer's
    variables do not reach JAX's compiled step, and a built layer's saved
    variables must not change), so its statistics cannot accumulate inside
    the step. Give the monitor `data` (inputs of the model, as `predict` takes
    them, for example a held-out batch) and at the end of each epoch it runs
    the model up to those layers over it and adds the same sparsity keys,
    computed over `data` with the epoch's final weights: ρ̂_j over all of
    `data`, and `<layer>_penalty` = β·Σ_j KL(ρ ‖ ρ̂_j) for that ρ̂ (one
    penalty over the whole data, not a mean of per-batch penalties). This
    needs a functional or Sequential model. Without `data` it logs
    `<layer>_beta` only and warns once.

    The statistics accumulate in the layers' non-trainable variables, updated
    inside the compiled training and evaluation steps on TensorFlow, JAX and
    PyTorch; the monitor resets them when an epoch (or its validation) begins
    and reads them when it ends. Between those, it computes nothing.

    Args:
        dead_threshold: a unit whose ρ̂_j over the epoch is below this is dead,
            a float in [0, 1).
        active_threshold: a latent dimension whose posterior mean varies more
            than this across the samples is active, a float >= 0.
        data: inputs of the model over which the layers that carry a
            `KLActivityRegularizer` are read at the end of each epoch, or None.
        batch_size: the batch size of that read (`predict`'s), an int >= 1.
    """

    def __init__(
        self,
        dead_threshold: float = 1e-3,
        active_threshold: float = 0.01,
        data: Any = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.data = data
        self.batch_size = _checks.check_positive_int("batch_size", batch_size)
        self._features: keras.Model | None = None
        self.dead_threshold = _checks.check_real(
            "dead_threshold", dead_threshold, "a float in [0, 1)", lambda v: 0.0 <= v < 1.0
        )
        self.active_threshold = _checks.check_weight("active_threshold", active_threshold)
        self._training_logs: dict[str, float] | None = None
        self._validation_logs: dict[str, float] | None = None
        self._fitting = False

    def _monitored(self) -> Iterator[_StatefulKLLayer]:
        """The built kl_keras layers that keep statistics, nested models included."""
        for layer in _layers(self.model):
            if isinstance(layer, _StatefulKLLayer) and layer.built:
                yield layer

    def _read(self) -> dict[str, float]:
        logs = {}
        for layer in self._monitored():
            values = layer.monitor_logs(self.dead_threshold, self.active_threshold)
            logs.update({f"{layer.name}_{key}": value for key, value in values.items()})
        return logs

    def _reset(self) -> None:
        for layer in self._monitored():
            layer.reset_statistics()

    def _betas(self) -> dict[str, float]:
        logs = {}
        for layer in self._monitored():
            logs[f"{layer.name}_beta"] = float(_numpy(layer.current_beta))
        for layer in _regularized(self.model):
            logs[f"{layer.name}_beta"] = layer.activity_regularizer.beta
        return logs

    def _regularizer_logs(self) -> dict[str, float]:
        """The sparsity keys of the regularized layers, read over `data`."""
        layers = _regularized(self.model)
        if self.data is None or not layers:
            return {}
        if self._features is None:
            outputs = [layer.output for layer in layers]
            self._features = keras.Model(self.model.inputs, outputs)
        activations = self._features.predict(self.data, batch_size=self.batch_size, verbose=0)
        if len(layers) == 1:
            activations = [activations]
        logs = {}
        for layer, values in zip(layers, activations, strict=True):
            for key, value in _regularizer_logs(layer, values, self.dead_threshold).items():
                logs[f"{layer.name}_{key}"] = value
        return logs

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._fitting = True
        self._features = None  # the model may have changed since the last fit
        stateless = [layer.name for layer in _regularized(self.model)]
        if stateless and self.data is None:
            warnings.warn(
                f"KLMonitor: the layers {stateless} carry a KLActivityRegularizer, which "
                "holds no state; only their beta is logged. To see rho_hat and dead units, "
                "pass data=... (inputs to read them over at each epoch end) to KLMonitor, "
                "or put a kl_keras.KLActivityRegularization layer after the activation.",
                stacklevel=2,
            )
        elif stateless and not getattr(self.model, "inputs", None):
            raise ValueError(
                f"KLMonitor(data=...) reads the layers {stateless} through a feature model, "
                "which needs a functional or Sequential model (one with `model.inputs`). "
                f"Received: a model of type {type(self.model).__name__}"
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
        logs.update(self._regularizer_logs())
        logs.update(self._betas())
        if self._validation_logs:
            logs.update({f"val_{key}": value for key, value in self._validation_logs.items()})
