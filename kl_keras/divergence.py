"""Kullback-Leibler divergences as pure functions of tensors.

Everything here is written with `keras.ops` alone, so it runs unchanged on the
TensorFlow, JAX and PyTorch backends. The functions take tensors whose
arguments were already checked by the caller (see `kl_keras.losses` and
`kl_keras.regularizers`) and hold no state.

Numerical conventions, shared by every function in this module:

- `0 * log(0) = 0` exactly: a zero in the target distribution contributes a
  zero term and a zero gradient, with no clipping of the target.
- Probabilities that enter a logarithm as a denominator are floored at
  `keras.config.epsilon()` (`1e-7` by default); the gradient is that of the
  log at the floored value, so it never becomes zero. Negative or NaN
  probabilities give NaN, never a plausible number.
- float16 and bfloat16 inputs are computed in float32.

Reference: S. Kullback and R. A. Leibler, "On Information and Sufficiency",
Annals of Mathematical Statistics 22(1), 1951.
"""

import keras
from keras import ops

_HALF_DTYPES = ("float16", "bfloat16")


def computation_dtype(dtype):
    """The dtype the divergences are computed in for inputs of `dtype`.

    float16 and bfloat16 are widened to float32; other float dtypes are kept;
    integer and boolean inputs are computed in `keras.config.floatx()`.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    if dtype in _HALF_DTYPES:
        return "float32"
    if keras.backend.is_float_dtype(dtype):
        return dtype
    return keras.config.floatx()


def clip_keep_gradient(x, min_value, max_value):
    """`clip(x, min_value, max_value)` whose gradient is that of `x` itself.

    The forward value is exactly the clipped one, taken with no gradient;
    `x - stop_gradient(x)` adds an exact zero that carries the identity
    gradient. A clipped log therefore still pulls a value that left the
    interval back into it, where a plain clip would return a zero gradient and
    stall training.
    """
    # Written with `where` (not `clip`) so that NaN stays NaN on every backend and
    # float64 stays float64 (Keras's torch backend clips float64 in float32).
    min_value = ops.convert_to_tensor(min_value, dtype=x.dtype)
    max_value = ops.convert_to_tensor(max_value, dtype=x.dtype)
    clipped = ops.where(x < min_value, min_value, ops.where(x > max_value, max_value, x))
    return ops.stop_gradient(clipped) + (x - ops.stop_gradient(x))


def _unpack_upstream(args, upstream):
    # The gradient function is called as grad(upstream) on TensorFlow and JAX and
    # as grad(*inputs, upstream=upstream) on PyTorch.
    if upstream is None:
        (upstream,) = args
    return upstream


def _floor_probabilities(y_pred):
    """`max(y_pred, epsilon)`, with NaN for negative or NaN `y_pred`.

    The floor only lifts zeros and underflows; a negative probability is a bug
    upstream and must not be turned into a plausible number.
    """
    # Written with `where` (not `maximum`): float64 stays float64 on Keras's
    # torch backend, which computes maximum(float64, float64) in float32.
    epsilon = ops.convert_to_tensor(keras.config.epsilon(), dtype=y_pred.dtype)
    nan = ops.convert_to_tensor(float("nan"), dtype=y_pred.dtype)
    return ops.where(y_pred >= epsilon, y_pred, ops.where(y_pred >= 0, epsilon, nan))


def kl_from_probabilities(y_true, y_pred, axis=-1):
    """KL(y_true ‖ y_pred) for two tensors of probabilities.

    ```python
    loss = sum(y_true * log(y_true / max(y_pred, epsilon)), axis=axis)
    ```

    Negative or NaN entries of `y_pred` give NaN. The gradient is written out
    rather than traced, reusing the forward pass's floored `y_pred` and log
    ratio: `-y_true / max(y_pred, epsilon)` with respect to `y_pred` (never 0
    where `y_true > 0`, also below the floor), and
    `log(y_true / max(y_pred, epsilon)) + 1` with respect to `y_true`.

    Args:
        y_true: target probabilities, floating point, the shape of `y_pred`.
        y_pred: predicted probabilities, floating point.
        axis: the axis that holds the distributions.

    Returns:
        The divergences, with `axis` removed.
    """

    @ops.custom_gradient
    def divergence(y_true, y_pred):
        is_zero = ops.equal(y_true, 0)
        safe_pred = _floor_probabilities(y_pred)
        # Where y_true is 0 the ratio is 1 / safe_pred: finite, so 0 * log(...) = 0.
        log_ratio = ops.log(ops.where(is_zero, 1.0, y_true) / safe_pred)
        loss = ops.sum(y_true * log_ratio, axis=axis)

        def gradient(*args, upstream=None):
            upstream = ops.expand_dims(_unpack_upstream(args, upstream), axis)
            grad_true = ops.where(is_zero, 0.0, log_ratio + 1.0)
            return upstream * grad_true, upstream * (-y_true / safe_pred)

        return loss, gradient

    return divergence(y_true, y_pred)


def kl_from_logits(y_true, logits, axis=-1):
    """KL(y_true ‖ softmax(logits)) computed through log-softmax.

    ```python
    loss = sum(y_true * (log(y_true) - log_softmax(logits, axis)), axis=axis)
    ```

    Nothing is clipped: the value is finite for every finite logit, a logit
    of `-inf` is allowed wherever `y_true` is 0. The gradient is written out:
    `softmax(logits) * sum(y_true) - y_true` with respect to the logits and
    `log(y_true) - log_softmax(logits) + 1` with respect to `y_true`, reusing
    the forward pass's log-softmax and log ratio.

    Args:
        y_true: target probabilities, floating point, the shape of `logits`.
        logits: unnormalised log-probabilities.
        axis: the axis that holds the distributions.

    Returns:
        The divergences, with `axis` removed.
    """

    @ops.custom_gradient
    def divergence(y_true, logits):
        is_zero = ops.equal(y_true, 0)
        log_pred = logits - ops.logsumexp(logits, axis=axis, keepdims=True)
        log_ratio = ops.log(ops.where(is_zero, 1.0, y_true)) - log_pred
        # The outer where keeps 0 * log_ratio = 0 where a masked logit is -inf.
        loss = ops.sum(y_true * ops.where(is_zero, 0.0, log_ratio), axis=axis)

        def gradient(*args, upstream=None):
            upstream = ops.expand_dims(_unpack_upstream(args, upstream), axis)
            total = ops.sum(y_true, axis=axis, keepdims=True)
            grad_logits = ops.exp(log_pred) * total - y_true
            grad_true = ops.where(is_zero, 0.0, log_ratio + 1.0)
            return upstream * grad_true, upstream * grad_logits

        return loss, gradient

    return divergence(y_true, logits)


def bernoulli_kl(rho, rho_hat):
    """KL(Bernoulli(rho) ‖ Bernoulli(rho_hat)), elementwise, both terms.

    ```python
    kl = rho * log(rho / rho_hat) + (1 - rho) * log((1 - rho) / (1 - rho_hat))
    ```

    `rho` is a Python float strictly inside (0, 1). `rho_hat` and
    `1 - rho_hat` are clipped to `[epsilon, 1 - epsilon]` (with
    `keras.config.epsilon()`) in the forward pass, with the gradient kept
    (see `clip_keep_gradient`), so saturated or out-of-range means give a
    large finite value that still has a gradient.

    Args:
        rho: the target activation, a float in (0, 1).
        rho_hat: tensor of observed mean activations.

    Returns:
        A tensor shaped like `rho_hat`, every entry >= 0.
    """
    epsilon = keras.config.epsilon()
    # 1 - rho_hat is clipped on its own: in float32, 1 - (1 - 1e-7) is 1.19e-7.
    on = clip_keep_gradient(rho_hat, epsilon, 1.0 - epsilon)
    off = clip_keep_gradient(1.0 - rho_hat, epsilon, 1.0 - epsilon)
    return rho * ops.log(rho / on) + (1.0 - rho) * ops.log((1.0 - rho) / off)
