"""Kullback-Leibler divergences as pure functions of tensors.

Everything here is written with `keras.ops` alone, so it runs unchanged on the
TensorFlow, JAX and PyTorch backends. The functions take tensors whose
arguments were already checked by the caller (see `kl_keras.losses` and
`kl_keras.regularizers`) and hold no state.

Numerical conventions, shared by every function in this module:

- `0 * log(0) = 0` exactly: a zero in the target distribution contributes a
  zero term and a zero gradient, with no clipping of the target.
- Probabilities that enter a logarithm as a denominator are floored at
  `keras.config.epsilon()` (`1e-7` by default) in the forward pass only: the
  gradient passes through the floor unchanged, so it never becomes zero.
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


def clip_keep_gradient(x, min_value, max_value=None):
    """`clip(x, min_value, max_value)` whose gradient is that of `x` itself.

    With `max_value=None` only the floor is applied. The forward value is
    exactly the clipped one, taken with no gradient; `x - stop_gradient(x)`
    adds an exact zero that carries the identity gradient. A clipped log
    therefore still pulls a value that left the interval back into it, where
    a plain clip would return a zero gradient and stall training.
    """
    if max_value is None:
        clipped = ops.maximum(x, min_value)
    else:
        clipped = ops.clip(x, min_value, max_value)
    return ops.stop_gradient(clipped) + (x - ops.stop_gradient(x))


def _target_terms(y_true, log_ratio):
    """`y_true * log_ratio(safe_y_true)` with `0 * log(0) = 0` exactly.

    `log_ratio` receives `y_true` with its zeros replaced by ones, so that no
    `log(0)` is ever evaluated, neither in the value nor in the gradient.
    Where `y_true == 0` the log ratio is replaced by 0 before the product, so
    the term is an exact 0 even if the log ratio there is infinite (a masked
    logit) and both gradients through it are 0.
    """
    is_zero = ops.equal(y_true, 0)
    safe_true = ops.where(is_zero, ops.ones_like(y_true), y_true)
    return y_true * ops.where(is_zero, ops.zeros_like(y_true), log_ratio(safe_true))


def kl_from_probabilities(y_true, y_pred, axis=-1):
    """KL(y_true ‖ y_pred) for two tensors of probabilities.

    ```python
    loss = sum(y_true * log(y_true / max(y_pred, epsilon)), axis=axis)
    ```

    Args:
        y_true: target probabilities, floating point.
        y_pred: predicted probabilities, floating point, broadcastable
            against `y_true`.
        axis: the axis that holds the distributions.

    Returns:
        The divergences, with `axis` removed from the broadcast shape.
    """
    safe_pred = clip_keep_gradient(y_pred, keras.config.epsilon())
    terms = _target_terms(y_true, lambda t: ops.log(t / safe_pred))
    return ops.sum(terms, axis=axis)


def kl_from_logits(y_true, logits, axis=-1):
    """KL(y_true ‖ softmax(logits)) computed through log-softmax.

    ```python
    loss = sum(y_true * (log(y_true) - log_softmax(logits, axis)), axis=axis)
    ```

    Nothing is clipped: the value is finite for every finite logit, a logit
    of `-inf` is allowed wherever `y_true` is 0, and the gradient with respect
    to the logits is `softmax(logits) * sum(y_true) - y_true`.

    Args:
        y_true: target probabilities, floating point.
        logits: unnormalised log-probabilities, broadcastable against `y_true`.
        axis: the axis that holds the distributions.

    Returns:
        The divergences, with `axis` removed from the broadcast shape.
    """
    log_pred = ops.log_softmax(logits, axis=axis)
    terms = _target_terms(y_true, lambda t: ops.log(t) - log_pred)
    return ops.sum(terms, axis=axis)


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
