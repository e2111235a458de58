"""KLMonitor: the numbers behind a KL term, in `fit`'s logs each epoch."""

import warnings
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np

from kl_keras import _checks
from kl_keras.layers import _StatefulKLLayer, sparsity_logs
from kl_keras.regularizers import KLActivityRegularizer

__all__ = ["AdaptiveKLController", "KLMonitor"]


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


class AdaptiveKLController(keras.callbacks.Callback):
    """Adapts the coefficient β of a KL penalty so that the KL follows a target.

    The proportional controller of Ziegler et al., "Fine-Tuning Language Models from
    Human Preferences" (2019), used by TRL's and OpenRLHF's PPO trainers:

    ```python
    error = clip(kl / target - 1, -0.2, 0.2)
    beta = beta * (1 + error * n / horizon)
    ```

    where `kl` is the KL observed over the last `n` training steps. As a callback it
    updates β at the end of every epoch of `fit`, with `kl = logs[kl_key]` (the
    epoch's mean of the model's KL metric) and `n` the epoch's number of steps; in a
    loop of your own, call `update(kl, n)`. `horizon` counts training steps (Ziegler et
    al. count samples: their horizon of 10000 samples is 10000 / batch size steps).

    β lives in the model, not here: `coefficient` names a non-trainable scalar
    `keras.Variable` of the model (an attribute created in the model's `__init__`
    with `self.add_weight(shape=(), trainable=False, ...)`), or is that variable.
    The model's `compute_loss` multiplies its KL penalty by it. Because it is one of
    the model's variables, JAX's compiled training step receives its new value at the
    next step, as TensorFlow and PyTorch do, and it is saved with the model. The value
    logged under the variable's attribute name (or `kl_coefficient`) is β after the
    update.

    Args:
        target: the KL to hold, a finite float > 0 (in the units of `logs[kl_key]`).
        horizon: the number of steps over which an error of 20% moves β by 20%, a
            finite float > 0.
        initial: β at the start of the first `fit` (not of later ones, so that a loop
            of `fit` calls carries β on); None keeps the variable's value.
        kl_key: the key of the observed KL in `fit`'s logs.
        coefficient: the name of the model's attribute that holds β, or the variable.
    """

    def __init__(
        self,
        target: float,
        horizon: float,
        initial: float | None = None,
        kl_key: str = "kl",
        coefficient: "str | keras.Variable" = "kl_coefficient",
    ) -> None:
        super().__init__()
        positive = "a finite float > 0"
        self.target = _checks.check_real("target", target, positive, lambda v: 0 < v < np.inf)
        self.horizon = _checks.check_real("horizon", horizon, positive, lambda v: 0 < v < np.inf)
        self.initial = None if initial is None else _checks.check_weight("initial", initial)
        if not isinstance(kl_key, str):
            raise TypeError(
                "Invalid type for argument `kl_key`. Expected a str. "
                f"Received: kl_key={kl_key!r} of type {type(kl_key).__name__}"
            )
        if not isinstance(coefficient, (str, keras.Variable)):
            raise TypeError(
                "Invalid type for argument `coefficient`. Expected the name of a model "
                f"attribute or a keras.Variable. Received: coefficient={coefficient!r} of "
                f"type {type(coefficient).__name__}"
            )
        self.kl_key = kl_key
        self.coefficient = coefficient
        self._started = False
        self._steps = 0

    def _variable(self) -> keras.Variable:
        if isinstance(self.coefficient, keras.Variable):
            variable = self.coefficient
        else:
            variable = getattr(self.model, self.coefficient, None)
        owned = isinstance(variable, keras.Variable) and any(
            v is variable for v in self.model.variables
        )
        if not owned or tuple(variable.shape) != () or variable.trainable:
            raise ValueError(
                "AdaptiveKLController needs β as a non-trainable scalar keras.Variable of the "
                "model (JAX's compiled step sees only the model's variables): create it in "
                "the model's __init__, `self.kl_coefficient = self.add_weight(shape=(), "
                "initializer='zeros', trainable=False, name='kl_coefficient')`. Received: "
                f"coefficient={self.coefficient!r}, which is {variable!r}"
            )
        return variable

    @property
    def _log_key(self) -> str:
        return self.coefficient if isinstance(self.coefficient, str) else "kl_coefficient"

    def update(self, kl: float, steps: int = 1) -> float:
        """Applies the control law for a KL of `kl` observed over `steps` steps; returns β."""
        variable = self._variable()
        error = float(np.clip(float(kl) / self.target - 1.0, -0.2, 0.2))
        beta = float(_numpy(variable)) * (1.0 + error * steps / self.horizon)
        variable.assign(beta)
        return beta

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        variable = self._variable()
        if not self._started and self.initial is not None:
            variable.assign(self.initial)
        self._started = True

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps += 1

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = {} if logs is None else logs
        if self.kl_key not in logs:
            raise ValueError(
                f"AdaptiveKLController: no `{self.kl_key}` in the logs of fit, whose keys are "
                f"{sorted(logs)}. Give the model a metric of its KL (for example a "
                f"keras.metrics.Mean(name={self.kl_key!r}) updated in compute_loss), or "
                "pass its key as kl_key=..."
            )
        logs[self._log_key] = self.update(logs[self.kl_key], self._steps)
