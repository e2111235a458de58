"""Metric twins of the kl_keras losses: running means over batches, as `keras.metrics`.

Use these in `metrics=` and `weighted_metrics=`: a `Loss` object in
`weighted_metrics` raises in Keras, and under `tf.distribute` a `Loss` object
used as a metric is divided by the number of replicas. Each metric is the
(sample-weighted) mean of the per-sample divergence over everything it has
seen since its last reset, like `keras.metrics.KLDivergence`, and takes the
arguments of its loss minus `reduction`.
"""

from collections.abc import Callable
from typing import Any

import keras

from kl_keras import _checks, _shell, losses
from kl_keras._types import Config, Tensor

__all__ = [
    "BinaryKLDivergence",
    "JeffreysDivergence",
    "JensenShannonDivergence",
    "KLDivergence",
    "ReverseKLDivergence",
]

_REGISTER = keras.saving.register_keras_serializable(package="kl_keras.metrics")


class _DivergenceMetric(_shell.StrictConfig, keras.metrics.MeanMetricWrapper):
    """A running mean of one kl_keras divergence function.

    Arguments beyond `from_logits` and `axis` (already checked) come as `parameters`, as in
    the losses: each becomes an attribute, is given to `fn` and is saved in the config.
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        name: str | None,
        dtype: str | keras.DTypePolicy | None,
        from_logits: bool,
        axis: int,
        **parameters: Any,
    ) -> None:
        from_logits = _checks.check_bool("from_logits", from_logits)
        axis = _checks.check_axis(axis)
        super().__init__(
            fn=fn, name=name, dtype=dtype, from_logits=from_logits, axis=axis, **parameters
        )
        self.from_logits = from_logits
        self.axis = axis
        self._parameter_names = tuple(parameters)
        for key, value in parameters.items():
            setattr(self, key, value)
        self._direction = "down"

    def get_config(self) -> Config:
        config = {
            "name": self.name,
            "dtype": self.dtype,
            "from_logits": self.from_logits,
            "axis": self.axis,
        }
        config.update({key: getattr(self, key) for key in self._parameter_names})
        return config


@_REGISTER
class KLDivergence(_DivergenceMetric):
    """Running mean of KL(y_true ‖ y_pred); see `kl_keras.kl_divergence`.

    Args:
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.
        name: name of the metric instance.
        dtype: dtype of the metric's result.

    Examples:
        >>> import numpy as np
        >>> metric = KLDivergence()
        >>> metric.update_state(np.array([[0.0, 1.0]]), np.array([[0.4, 0.6]]))
        >>> round(float(metric.result()), 4)
        0.5108
    """

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        name: str | None = "kl_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(losses.kl_divergence, name, dtype, from_logits, axis)


@_REGISTER
class ReverseKLDivergence(_DivergenceMetric):
    """Running mean of KL(y_pred ‖ y_true); see `kl_keras.reverse_kl_divergence`.

    Args:
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.
        name: name of the metric instance.
        dtype: dtype of the metric's result.
    """

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        name: str | None = "reverse_kl_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(losses.reverse_kl_divergence, name, dtype, from_logits, axis)


@_REGISTER
class JeffreysDivergence(_DivergenceMetric):
    """Running mean of the Jeffreys divergence; see `kl_keras.jeffreys_divergence`.

    Args:
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.
        name: name of the metric instance.
        dtype: dtype of the metric's result.
    """

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        name: str | None = "jeffreys_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(losses.jeffreys_divergence, name, dtype, from_logits, axis)


@_REGISTER
class JensenShannonDivergence(_DivergenceMetric):
    """Running mean of the Jensen-Shannon divergence; see `kl_keras.jensen_shannon_divergence`.

    Args:
        beta: the weight of `y_true` in the mixture, a float in [0, 1].
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.
        name: name of the metric instance.
        dtype: dtype of the metric's result.
    """

    def __init__(
        self,
        beta: float = 0.5,
        from_logits: bool = False,
        axis: int = -1,
        name: str | None = "jensen_shannon_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        beta = _checks.check_beta(beta)
        super().__init__(
            losses.jensen_shannon_divergence, name, dtype, from_logits, axis, beta=beta
        )


@_REGISTER
class BinaryKLDivergence(_DivergenceMetric):
    """Running mean of the binary KL divergence; see `kl_keras.binary_kl_divergence`.

    Args:
        from_logits: whether `y_pred` holds sigmoid logits.
        axis: the axis summed over (the independent outputs).
        name: name of the metric instance.
        dtype: dtype of the metric's result.
    """

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        name: str | None = "binary_kl_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(losses.binary_kl_divergence, name, dtype, from_logits, axis)
