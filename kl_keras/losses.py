"""Keras losses for the Kullback-Leibler divergence and its family.

P is `y_true`, Q is `y_pred` (or its softmax, with `from_logits=True`), both along
`axis`. Each divergence is a registered function returning one value per
distribution, and a registered `keras.losses.Loss` that leaves reductions,
`sample_weight` and masks to Keras.
"""

from typing import Any

import keras

from kl_keras import _checks, _shell
from kl_keras._types import Config, Tensor

_REGISTER = keras.saving.register_keras_serializable(package="kl_keras")


@_REGISTER
def kl_divergence(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, axis: int = -1
) -> Tensor:
    """Kullback-Leibler divergence KL(y_true ‖ y_pred) along `axis`.

    The direction is the one of `keras.losses.kl_divergence`: `y_true` is the
    reference distribution P, `y_pred` the model's Q, and the loss is
    `KL(P ‖ Q)` (forward KL, mass-covering).

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
      gradient, `-y_true / max(y_pred, epsilon)`, never becomes 0. For
      `y_pred >= epsilon` and `y_true > 0` the values equal those of
      `keras.losses.kl_divergence`.
    - With `from_logits=True` nothing is clipped: every finite logit gives a
      finite value, a logit of `-inf` is allowed where `y_true == 0`, and the
      gradient with respect to the logits is `softmax(y_pred) * sum(y_true) -
      y_true`. The value is computed from the centred difference of
      `log(y_true)` and the logits, so the divergence of the normalized
      target keeps its digits where the two distributions are close, up to
      the rounding of `log(y_true)` of a float32 target; the plain formula's
      term in `sum(y_true) - 1` is resolved only to a float32 sum's 1.2e-7
      (the numerics guide: pass the teacher's logits to `LogitsDistillation`
      where it matters).
    - A distribution with a negative or NaN entry in either argument has a NaN
      value and NaN gradients; other distributions are untouched.
    - Every derivative is traced by the backend: reverse and forward mode,
      second order and vectorising maps are exact.
    - float16 and bfloat16 inputs are computed in float32 and the result is
      cast back to the dtype of `y_pred`.

    Args:
        y_true: target probabilities.
        y_pred: predicted probabilities, or logits if `from_logits=True`;
            broadcastable against `y_true`, with the same size along `axis`.
            `y_true` is cast to its dtype.
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.

    Returns:
        The divergence for each distribution: the broadcast shape of the
        inputs with `axis` removed, e.g. `(batch,)` for `(batch, classes)`.

    Examples:
        >>> import numpy as np
        >>> y_true = np.array([[0.0, 1.0], [0.5, 0.5]])
        >>> y_pred = np.array([[0.4, 0.6], [0.5, 0.5]])
        >>> loss = kl_divergence(y_true, y_pred)
        >>> tuple(loss.shape)
        (2,)
        >>> [round(float(v), 4) for v in loss]
        [0.5108, 0.0]
    """
    return _shell.divergence("kl", _shell.kind(from_logits), y_true, y_pred, axis)


kld = kl_divergence


@_REGISTER
def reverse_kl_divergence(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, axis: int = -1
) -> Tensor:
    """Reverse Kullback-Leibler divergence KL(y_pred ‖ y_true) along `axis`.

    The model's Q comes first: mode-seeking, it penalises Q for putting mass
    where P has little, and not for missing some of P's modes.

    ```python
    loss = sum(y_pred * log(y_pred / y_true), axis=axis)  # = kl_divergence(y_pred, y_true)
    ```

    Same conventions as `kl_divergence`, with the roles swapped: entries with
    `y_pred == 0` contribute exactly 0, and `y_true` is floored at
    `keras.config.epsilon()` inside the log with its gradient kept, so
    `y_true == 0 < y_pred` gives a large finite value (about
    `16.1 * y_pred`) whose gradient still pushes `y_pred` down. With
    `from_logits=True`, Q is `softmax(y_pred)` through log-softmax.
    `torch.nn.functional.kl_div(log(P), Q)` computes this direction.

    Args:
        y_true: target probabilities P.
        y_pred: predicted probabilities Q, or logits if `from_logits=True`.
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.

    Returns:
        One divergence per distribution, with `axis` removed.

    Examples:
        >>> import numpy as np
        >>> p = np.array([0.7, 0.2, 0.1])
        >>> q = np.array([0.2, 0.5, 0.3])
        >>> round(float(reverse_kl_divergence(p, q)), 5)
        0.53718
    """
    return _shell.divergence("reverse_kl", _shell.kind(from_logits), y_true, y_pred, axis)


@_REGISTER
def jeffreys_divergence(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, axis: int = -1
) -> Tensor:
    """Jeffreys (symmetric) divergence KL(y_true ‖ y_pred) + KL(y_pred ‖ y_true).

    ```python
    loss = sum((y_true - y_pred) * (log(y_true) - log(y_pred)), axis=axis)
    ```

    Symmetric in P and Q, unbounded, and weighted 1:1 between the two
    directions (torchtune and DistiLLM weight a "symmetric" KL differently,
    in opposite directions). Both logarithms are floored at
    `keras.config.epsilon()` with the gradient kept (with `from_logits=True`,
    only `log(y_true)`: `log_softmax` needs no floor), so a zero on either side
    gives a large finite value; where every entry is at least epsilon the value
    is exactly `kl_divergence + reverse_kl_divergence`, and an entry below it
    changes that sum by at most epsilon / e.

    Args:
        y_true: target probabilities P.
        y_pred: predicted probabilities Q, or logits if `from_logits=True`.
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.

    Returns:
        One divergence per distribution, with `axis` removed.

    Examples:
        >>> import numpy as np
        >>> p = np.array([0.7, 0.2, 0.1])
        >>> q = np.array([0.2, 0.5, 0.3])
        >>> round(float(jeffreys_divergence(p, q)), 6)
        1.120991
    """
    return _shell.divergence("jeffreys", _shell.kind(from_logits), y_true, y_pred, axis)


@_REGISTER
def jensen_shannon_divergence(
    y_true: Tensor, y_pred: Tensor, beta: float = 0.5, from_logits: bool = False, axis: int = -1
) -> Tensor:
    """Generalised Jensen-Shannon divergence with mixture weight `beta`, along `axis`.

    ```python
    m = beta * y_true + (1 - beta) * y_pred
    loss = (1 - beta) * KL(y_true ‖ m) + beta * KL(y_pred ‖ m)
    ```

    Continuous in `beta` on [0, 1]: `beta=0` is exactly `kl_divergence`
    (forward), `beta=1` exactly `reverse_kl_divergence`, and `beta=0.5` the
    classic symmetric JSD, bounded by `log(2)`. The endpoints are those TRL
    documents for the `beta` of its `generalized_jsd_loss`, whose interior
    value differs next to both ends (the numbers: the "which divergence?"
    guide). For `0 < beta < 1`, M is positive wherever P or Q is, so nothing
    is floored;
    with `from_logits=True`, log M is computed in log space
    (`logaddexp(log(beta) + log P, log(1 - beta) + log_softmax(y_pred))`).

    Args:
        y_true: target probabilities P.
        y_pred: predicted probabilities Q, or logits if `from_logits=True`.
        beta: the weight of P in the mixture M, a float in [0, 1].
        from_logits: whether `y_pred` holds logits along `axis`.
        axis: the axis along which the distributions lie.

    Returns:
        One divergence per distribution, with `axis` removed.

    Examples:
        >>> import numpy as np
        >>> p = np.array([0.7, 0.2, 0.1])
        >>> q = np.array([0.2, 0.5, 0.3])
        >>> round(float(jensen_shannon_divergence(p, q)), 6)
        0.132918
        >>> round(float(jensen_shannon_divergence(p, q, beta=0.25)), 6)
        0.230735
    """
    kind = _shell.kind(from_logits)
    return _shell.divergence("jensen_shannon", kind, y_true, y_pred, axis, beta=beta)


@_REGISTER
def binary_kl_divergence(
    y_true: Tensor, y_pred: Tensor, from_logits: bool = False, axis: int = -1
) -> Tensor:
    """KL divergence of independent binary outputs, summed over `axis`.

    For sigmoid units and multi-label soft targets: each entry is the
    probability of one independent event, and both of its outcomes count
    (a positive-class probability alone is not a distribution):

    ```python
    loss = sum(y_true * log(y_true / y_pred)
               + (1 - y_true) * log((1 - y_true) / (1 - y_pred)), axis=axis)
    ```

    It is `binary_crossentropy` minus the entropy of `y_true`, summed where
    Keras's `binary_crossentropy` averages over `axis`: the same gradient
    with respect to `y_pred` up to that factor, and 0 when `y_pred == y_true`.
    `y_pred` and `1 - y_pred` are floored at `keras.config.epsilon()` with the
    gradient kept; with `from_logits=True` it is computed through
    `log_sigmoid` and nothing is clipped. `0 * log(0) = 0` for both terms.

    Args:
        y_true: target probabilities of the events, in [0, 1].
        y_pred: predicted probabilities, or sigmoid logits if `from_logits=True`.
        from_logits: whether `y_pred` holds sigmoid logits.
        axis: the axis summed over (the independent outputs).

    Returns:
        One value per sample, with `axis` removed.

    Examples:
        >>> import numpy as np
        >>> round(float(binary_kl_divergence(np.array([0.7, 0.2]), np.array([0.4, 0.5]))), 6)
        0.376532
    """
    return _shell.divergence("binary_kl", _shell.kind(from_logits), y_true, y_pred, axis)


class _DivergenceLoss(_shell.StrictConfig, keras.losses.Loss):
    """A `keras.losses.Loss` over one registered divergence function.

    A subclass names its `function` and passes its own arguments beyond `from_logits` and
    `axis` (already checked) as `parameters`: each becomes an attribute, is given to
    `function` in every call and is saved in the config.
    """

    function: Any  # the registered function, as a staticmethod

    def __init__(
        self,
        from_logits: bool,
        axis: int,
        reduction: str | None,
        name: str | None,
        dtype: str | keras.DTypePolicy | None,
        **parameters: Any,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = _checks.check_bool("from_logits", from_logits)
        self.axis = _checks.check_axis(axis)
        self._parameter_names = tuple(parameters)
        for key, value in parameters.items():
            setattr(self, key, value)
        # Keras's Loss.get_config leaves `dtype` out on some versions: kept here, as given.
        self._dtype_argument = None if dtype is None else self._dtype_policy.name

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        parameters = {key: getattr(self, key) for key in self._parameter_names}
        return self.function(
            y_true, y_pred, from_logits=self.from_logits, axis=self.axis, **parameters
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            {"from_logits": self.from_logits, "axis": self.axis, "dtype": self._dtype_argument}
        )
        config.update({key: getattr(self, key) for key in self._parameter_names})
        return config


@_REGISTER
class KLDivergence(_DivergenceLoss):
    """Kullback-Leibler divergence loss KL(y_true ‖ y_pred).

    A replacement for `keras.losses.KLDivergence` in `compile` that is exact
    where `y_true` has zeros, accepts logits, and lets you choose the axis.
    It is not a drop-in replacement inside
    `keras.distillation.LogitsDistillation`, which passes raw teacher logits
    as `y_true` (they are not probabilities, and the value is NaN):

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

    Examples:
        >>> import numpy as np
        >>> loss = KLDivergence(from_logits=True)
        >>> y_true = np.array([[1.0, 0.0, 0.0]])
        >>> logits = np.array([[-20.0, 20.0, 0.0]])
        >>> round(float(loss(y_true, logits)), 3)
        40.0
    """

    function = staticmethod(kl_divergence)

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "kl_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(from_logits, axis, reduction, name, dtype)


@_REGISTER
class ReverseKLDivergence(_DivergenceLoss):
    """Reverse Kullback-Leibler divergence loss KL(y_pred ‖ y_true), mode-seeking.

    See `kl_keras.reverse_kl_divergence` for the formula and conventions.

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
    """

    function = staticmethod(reverse_kl_divergence)

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "reverse_kl_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(from_logits, axis, reduction, name, dtype)


@_REGISTER
class JeffreysDivergence(_DivergenceLoss):
    """Jeffreys (symmetric KL) loss KL(y_true ‖ y_pred) + KL(y_pred ‖ y_true).

    See `kl_keras.jeffreys_divergence` for the formula and conventions.

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
    """

    function = staticmethod(jeffreys_divergence)

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "jeffreys_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(from_logits, axis, reduction, name, dtype)


@_REGISTER
class JensenShannonDivergence(_DivergenceLoss):
    """Jensen-Shannon divergence loss with mixture weight `beta`, continuous on [0, 1].

    `beta=0.5` is the classic JSD; `beta=0` and `beta=1` are forward and
    reverse KL. See `kl_keras.jensen_shannon_divergence`.

    Args:
        beta: the weight of `y_true` in the mixture, a float in [0, 1].
        from_logits: whether `y_pred` holds logits along `axis` (computed
            through log-softmax, never clipped) rather than probabilities.
        axis: the axis along which the distributions lie.
        reduction: one of `"sum_over_batch_size"`, `"sum"`, `"mean"`,
            `"mean_with_sample_weight"`, `"none"` or `None`, as in Keras.
        name: name of the loss instance.
        dtype: dtype of the loss's computations, as in Keras losses; `None`
            means `keras.config.floatx()`. float16 and bfloat16 are computed
            in float32 internally.
    """

    function = staticmethod(jensen_shannon_divergence)

    def __init__(
        self,
        beta: float = 0.5,
        from_logits: bool = False,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "jensen_shannon_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        beta = _checks.check_beta(beta)
        super().__init__(from_logits, axis, reduction, name, dtype, beta=beta)


@_REGISTER
class BinaryKLDivergence(_DivergenceLoss):
    """KL divergence loss of independent binary outputs (sigmoid units, multi-label targets).

    See `kl_keras.binary_kl_divergence`; `from_logits=True` takes sigmoid logits.

    Args:
        from_logits: whether `y_pred` holds sigmoid logits (computed through
            log-sigmoid, never clipped) rather than probabilities.
        axis: the axis summed over (the independent outputs).
        reduction: one of `"sum_over_batch_size"`, `"sum"`, `"mean"`,
            `"mean_with_sample_weight"`, `"none"` or `None`, as in Keras.
        name: name of the loss instance.
        dtype: dtype of the loss's computations, as in Keras losses; `None`
            means `keras.config.floatx()`. float16 and bfloat16 are computed
            in float32 internally.
    """

    function = staticmethod(binary_kl_divergence)

    def __init__(
        self,
        from_logits: bool = False,
        axis: int = -1,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "binary_kl_divergence",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(from_logits, axis, reduction, name, dtype)
