"""Kullback-Leibler divergences and their family as pure functions of tensors.

Everything here is written with `keras.ops` alone, so it runs unchanged on the
TensorFlow, JAX and PyTorch backends, and every derivative is traced by the
backend's own autodiff: reverse mode, forward mode, second order and
vectorising maps (`jax.vmap`, `torch.func`, `tf.vectorized_map`) all see the
same formula. The functions take tensors whose arguments were already checked
by the caller (see `kl_keras.losses` and `kl_keras.regularizers`) and hold no
state.

Numerical conventions, shared by every function in this module:

- `0 * log(0) = 0` exactly: a zero in the target distribution contributes a
  zero term and a zero gradient, with no clipping of the target (a double
  `where`, so that neither the value nor any derivative sees the unused
  branch).
- Probabilities that enter a logarithm as a denominator are floored at
  `keras.config.epsilon()` (`1e-7` by default) with the derivative of the
  unfloored value kept (see `floor_probabilities`), so the gradient never
  becomes zero.
- A distribution with a negative or NaN entry, in either argument, has a NaN
  value, and a NaN value has NaN derivatives with respect to every entry of
  both arguments; other distributions are untouched (see
  `nan_gradients_where_nan`).
- float16 and bfloat16 inputs are computed in float32.

Reference: S. Kullback and R. A. Leibler, "On Information and Sufficiency",
Annals of Mathematical Statistics 22(1), 1951.
"""

import math
from typing import Any

import keras
from keras import ops

from kl_keras import _checks, _kernels
from kl_keras._types import Tensor

_HALF_DTYPES = ("float16", "bfloat16")


def computation_dtype(dtype: Any) -> str:
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


def clip_keep_gradient(x: Tensor, min_value: float, max_value: float) -> Tensor:
    """`clip(x, min_value, max_value)` whose derivative is that of `x` itself.

    The value is exactly the clipped one; below and above the interval the
    value is the bound plus `x - stop_gradient(x)`, an exact zero that carries
    the identity derivative in every autodiff mode. A clipped log therefore
    still pulls a value that left the interval back into it, where a plain clip
    would return a zero gradient and stall training.
    """
    # Written with `where` (not `clip`) so that NaN stays NaN on every backend and
    # float64 stays float64 (Keras's torch backend clips float64 in float32).
    identity = x - ops.stop_gradient(x)
    low = ops.where(x < min_value, min_value + identity, x)
    return ops.where(x > max_value, max_value + identity, low)


def floor_probabilities(x: Tensor) -> Tensor:
    """`max(x, epsilon)` with the derivative of `x` kept, and NaN for negative `x`.

    The floor only lifts zeros and underflows (the derivative below it is that
    of `x` itself, see `clip_keep_gradient`); a negative probability is a bug
    upstream and must not become a plausible number.
    """
    epsilon = keras.config.epsilon()
    # The identity term is added outside the inner `where`: its derivative is 1 for
    # every entry (so a negative entry's NaN reaches its own gradient), and no branch
    # has a NaN derivative that could leak into the entries that do not use it.
    floor = ops.cast(ops.where(x >= 0, epsilon, float("nan")), x.dtype)
    lifted = floor + (x - ops.stop_gradient(x))
    return ops.where(x >= epsilon, x, lifted)


def nan_gradients_where_nan(values: Tensor) -> Tensor:
    """`values`, each NaN one made to carry NaN derivatives in every autodiff mode.

    Each value is multiplied by 1 (exact) where it is a number and by NaN where
    it is NaN, so the cotangent entering a NaN distribution (reverse mode) and
    its tangent (forward mode) are NaN: every entry of both arguments of that
    distribution gets a NaN gradient, where a formula alone can leave some
    finite (a negative target makes only its own term NaN). A NaN loss never
    comes with a plausible training step. Other distributions are untouched.
    """
    scale = ops.cast(ops.where(ops.isnan(values), float("nan"), 1.0), values.dtype)
    return values * scale


def _weighted_terms(weights: Tensor, log_ratio: Tensor) -> Tensor:
    """`weights * log_ratio` with `0 * log_ratio = 0` wherever `weights == 0`.

    The inner `where` keeps `0 * inf` (a masked logit, a zero denominator) out
    of the value and out of every derivative. Negative or NaN weights are not
    zero: their log ratio is NaN, and so is the term.
    """
    return weights * ops.where(weights == 0, 0.0, log_ratio)


def _log_target(y_true: Tensor) -> Tensor:
    """`log(y_true)`; 0 where `y_true == 0` (unused there), NaN where it is negative."""
    return ops.log(ops.where(y_true == 0, 1.0, y_true))


def _positive_or_nan(x: Tensor) -> Tensor:
    """`x` where positive, 1 where 0 (a weight-0 entry), NaN where negative or NaN."""
    return ops.where(x > 0, x, ops.cast(ops.where(x == 0, 1.0, float("nan")), x.dtype))


def _kl_terms(p: Tensor, q: Tensor) -> Tensor:
    """The terms `p * log(p / max(q, epsilon))` of KL(p ‖ q) on probabilities, elementwise.

    The log of the ratio is taken in one `log`, which is more precise than a
    difference of logs when the two distributions are close; `q` is floored with
    its derivative kept (see `floor_probabilities`).
    """
    safe_p = ops.where(p == 0, 1.0, p)
    return _weighted_terms(p, ops.log(safe_p / floor_probabilities(q)))


def kl_from_probabilities(y_true: Tensor, y_pred: Tensor, axis: int = -1) -> Tensor:
    """KL(y_true ‖ y_pred) for two tensors of probabilities.

    ```python
    loss = sum(y_true * log(y_true / max(y_pred, epsilon)), axis=axis)
    ```

    The floor lifts zeros and underflows in `y_pred` with the derivative kept
    (`-y_true / max(y_pred, epsilon)` never becomes 0 where `y_true > 0`).

    Args:
        y_true: target probabilities, floating point, broadcastable with `y_pred`.
        y_pred: predicted probabilities, floating point.
        axis: the axis that holds the distributions.

    Returns:
        The divergences, with `axis` removed.
    """
    return nan_gradients_where_nan(ops.sum(_kl_terms(y_true, y_pred), axis=axis))


def kl_from_logits(y_true: Tensor, logits: Tensor, axis: int = -1) -> Tensor:
    """KL(y_true ‖ softmax(logits)) computed through log-softmax.

    ```python
    loss = sum(y_true * (log(y_true) - log_softmax(logits, axis)), axis=axis)
    ```

    Nothing is clipped: the value is finite for every finite logit, and a
    logit of `-inf` is allowed wherever `y_true` is 0 (a masked class). The
    gradient with respect to the logits is `softmax(logits) * sum(y_true) -
    y_true`.

    Args:
        y_true: target probabilities, floating point, broadcastable with `logits`.
        logits: unnormalised log-probabilities.
        axis: the axis that holds the distributions.

    Returns:
        The divergences, with `axis` removed.
    """
    if _kernels.op_by_op():
        # Fewest full-size temporaries where each op is a kernel: the target's entropy
        # and the cross term are two sums, with no log ratio formed between them.
        zero = y_true == 0
        entropy = ops.sum(y_true * ops.log(ops.where(zero, 1.0, y_true)), axis=axis)
        log_pred = _kernels.log_softmax(logits, axis)
        cross = ops.sum(y_true * ops.where(zero, 0.0, log_pred), axis=axis)
        return nan_gradients_where_nan(entropy - cross)
    log_ratio = _log_target(y_true) - _kernels.log_softmax(logits, axis)
    return nan_gradients_where_nan(ops.sum(_weighted_terms(y_true, log_ratio), axis=axis))


def reverse_kl_from_probabilities(y_true: Tensor, y_pred: Tensor, axis: int = -1) -> Tensor:
    """KL(y_pred ‖ y_true): `sum(y_pred * log(y_pred / max(y_true, epsilon)))`."""
    return kl_from_probabilities(y_pred, y_true, axis=axis)


def reverse_kl_from_logits(y_true: Tensor, logits: Tensor, axis: int = -1) -> Tensor:
    """KL(softmax(logits) ‖ y_true), with `y_true` floored at epsilon inside the log.

    ```python
    q = softmax(logits)
    loss = sum(q * (log_softmax(logits) - log(max(y_true, epsilon))), axis=axis)
    ```
    """
    log_pred = _kernels.log_softmax(logits, axis)
    log_ratio = log_pred - ops.log(floor_probabilities(y_true))
    return nan_gradients_where_nan(ops.sum(_weighted_terms(ops.exp(log_pred), log_ratio), axis))


def _log_floor(x: Tensor) -> Tensor:
    """`log(max(x, epsilon))` with the derivative kept below the floor; NaN for negative `x`."""
    return ops.log(floor_probabilities(x))


def jeffreys_from_probabilities(y_true: Tensor, y_pred: Tensor, axis: int = -1) -> Tensor:
    """KL(y_true ‖ y_pred) + KL(y_pred ‖ y_true) on probabilities, both floored at epsilon.

    ```python
    loss = sum((y_true - y_pred) * (log(max(y_true, epsilon)) - log(max(y_pred, epsilon))))
    ```

    Symmetric in its arguments. Where both are at least epsilon it is forward plus reverse
    KL exactly; an entry below epsilon differs from that sum by at most epsilon / e.
    """
    terms = (y_true - y_pred) * (_log_floor(y_true) - _log_floor(y_pred))
    return nan_gradients_where_nan(ops.sum(terms, axis=axis))


def jeffreys_from_logits(y_true: Tensor, logits: Tensor, axis: int = -1) -> Tensor:
    """KL(y_true ‖ q) + KL(q ‖ y_true), q = softmax(logits), `y_true` floored at epsilon.

    ```python
    loss = sum((y_true - q) * (log(max(y_true, epsilon)) - log_softmax(logits)), axis=axis)
    ```

    A logit of `-inf` (q = 0) is allowed wherever `y_true` is 0.
    """
    log_pred = _kernels.log_softmax(logits, axis)
    # A masked class with no target mass (y_true = 0, logit -inf) is 0 * inf: exactly 0.
    masked = ops.logical_and(y_true == 0, ops.isinf(log_pred))
    log_ratio = ops.where(masked, 0.0, _log_floor(y_true) - log_pred)
    terms = (y_true - ops.exp(log_pred)) * log_ratio
    return nan_gradients_where_nan(ops.sum(terms, axis=axis))


def jensen_shannon_from_probabilities(
    y_true: Tensor, y_pred: Tensor, beta: float = 0.5, axis: int = -1
) -> Tensor:
    """(1 - beta) KL(P ‖ M) + beta KL(Q ‖ M), M = beta P + (1 - beta) Q, on probabilities.

    `beta` is a Python float in [0, 1]; 0 and 1 are forward and reverse KL exactly,
    with their floors. Between them M > 0 wherever P or Q is, so nothing is floored.
    """
    if beta == 0.0:
        return kl_from_probabilities(y_true, y_pred, axis=axis)
    if beta == 1.0:
        return reverse_kl_from_probabilities(y_true, y_pred, axis=axis)
    # Where P and Q are within a factor 2 of each other (the small-JSD regime), log(P / M)
    # is -log1p((1 - beta) (Q - P) / P), and log(Q / M) likewise: no M is formed, and close
    # distributions keep their digits. Elsewhere the logs are far apart and are subtracted
    # directly, M in log space: a ratio such as P / Q would overflow for a tiny Q. Each
    # unused branch sees a finite argument (divisor 1), so no derivative leaks a NaN. A
    # negative or NaN entry is NaN in both branches; an entry of 0 has weight 0.
    safe_true, safe_pred = _positive_or_nan(y_true), _positive_or_nan(y_pred)
    log_true, log_pred = ops.log(safe_true), ops.log(safe_pred)
    weighted_true = math.log(beta) + log_true
    weighted_pred = math.log(1.0 - beta) + log_pred
    log_mixture = ops.where(
        y_true == 0,
        weighted_pred,
        ops.where(y_pred == 0, weighted_true, ops.logaddexp(weighted_true, weighted_pred)),
    )
    difference = y_pred - y_true
    close_to_true = ops.abs(difference) < safe_true
    close_to_pred = ops.abs(difference) < safe_pred
    log_true_ratio = ops.where(
        close_to_true,
        -ops.log1p((1.0 - beta) * difference / ops.where(close_to_true, safe_true, 1.0)),
        log_true - log_mixture,
    )
    log_pred_ratio = ops.where(
        close_to_pred,
        -ops.log1p(-beta * difference / ops.where(close_to_pred, safe_pred, 1.0)),
        log_pred - log_mixture,
    )
    terms = (1.0 - beta) * _weighted_terms(y_true, log_true_ratio)
    terms = terms + beta * _weighted_terms(y_pred, log_pred_ratio)
    return nan_gradients_where_nan(ops.sum(terms, axis=axis))


def jensen_shannon_from_logits(
    y_true: Tensor, logits: Tensor, beta: float = 0.5, axis: int = -1
) -> Tensor:
    """Jensen-Shannon divergence of `y_true` and `softmax(logits)`, M in log space.

    `log M = logaddexp(log(beta) + log P, log(1 - beta) + log_softmax(logits))`:
    M is never formed by adding probabilities that came from logits.
    """
    if beta == 0.0:
        return kl_from_logits(y_true, logits, axis=axis)
    if beta == 1.0:
        return reverse_kl_from_logits(y_true, logits, axis=axis)
    log_true = _log_target(y_true)
    log_pred = _kernels.log_softmax(logits, axis)
    weighted_pred = math.log(1.0 - beta) + log_pred
    log_mixture = ops.where(
        y_true == 0, weighted_pred, ops.logaddexp(math.log(beta) + log_true, weighted_pred)
    )
    terms = (1.0 - beta) * _weighted_terms(y_true, log_true - log_mixture)
    terms = terms + beta * _weighted_terms(ops.exp(log_pred), log_pred - log_mixture)
    return nan_gradients_where_nan(ops.sum(terms, axis=axis))


def binary_kl_from_probabilities(y_true: Tensor, y_pred: Tensor, axis: int = -1) -> Tensor:
    """Sum over `axis` of KL(Bernoulli(y_true) ‖ Bernoulli(y_pred)), both terms.

    `y_pred` and `1 - y_pred` are each floored at epsilon with the derivative kept.
    """
    terms = _kl_terms(y_true, y_pred) + _kl_terms(1.0 - y_true, 1.0 - y_pred)
    return nan_gradients_where_nan(ops.sum(terms, axis=axis))


def binary_kl_from_logits(y_true: Tensor, logits: Tensor, axis: int = -1) -> Tensor:
    """Binary KL against `sigmoid(logits)`, through log-sigmoids: nothing is clipped."""
    log_on, log_off = _kernels.log_sigmoids(logits)
    positive = _weighted_terms(y_true, _log_target(y_true) - log_on)
    off = 1.0 - y_true
    negative = _weighted_terms(off, _log_target(off) - log_off)
    return nan_gradients_where_nan(ops.sum(positive + negative, axis=axis))


DISTILLATION_DIVERGENCES = ("kl", "reverse_kl", "jeffreys", "jensen_shannon")


def _floor_log(log_x: Tensor) -> Tensor:
    """`max(log_x, log(epsilon))`, NaN kept; the derivative below the floor is 0."""
    log_epsilon = math.log(keras.config.epsilon())
    keep = ops.logical_or(log_x >= log_epsilon, ops.isnan(log_x))
    return ops.where(keep, log_x, log_epsilon)


def distillation_from_logits(
    teacher_logits: Tensor,
    student_logits: Tensor,
    temperature: float,
    divergence: str,
    beta: float,
    axis: int,
) -> Tensor:
    """`temperature**2 * D(softmax(teacher / T) ‖ softmax(student / T))`, both sides in log space.

    `divergence` is one of `DISTILLATION_DIVERGENCES`; `temperature` a Python float > 0
    and `beta` one in [0, 1], both checked by the caller. With P the teacher's and Q the
    student's distribution at temperature T:

    - `"kl"`: KL(P ‖ Q); `"reverse_kl"`: KL(Q ‖ P); `"jeffreys"`: their sum;
      `"jensen_shannon"`: (1 - beta) KL(P ‖ M) + beta KL(Q ‖ M), M = beta P + (1 - beta) Q,
      with log M the `logaddexp` of the weighted log-probabilities.
    - Teacher logits of `-inf` (masked entries): exact for `"kl"` and `"jensen_shannon"`.
      For `"reverse_kl"` and `"jeffreys"` the true value is infinite wherever the student
      puts mass there, so log P is floored at `log(epsilon)` (derivative 0 below it).
    """
    log_true = _kernels.log_softmax(teacher_logits / temperature, axis)
    log_pred = _kernels.log_softmax(student_logits / temperature, axis)
    true, pred = ops.exp(log_true), ops.exp(log_pred)
    if divergence == "jensen_shannon" and beta == 0.0:
        divergence = "kl"
    if divergence == "jensen_shannon" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "kl":
        terms = _weighted_terms(true, log_true - log_pred)
    elif divergence == "reverse_kl":
        terms = _weighted_terms(pred, log_pred - _floor_log(log_true))
    elif divergence == "jeffreys":
        # A class masked on both sides (P = Q = 0) is 0 * inf: exactly 0.
        both_masked = ops.logical_and(ops.isinf(log_true), ops.isinf(log_pred))
        log_ratio = ops.where(both_masked, 0.0, _floor_log(log_true) - log_pred)
        terms = (true - pred) * log_ratio
    else:
        # Where both are masked, logaddexp(-inf, -inf) has NaN derivatives: give it zeros.
        both_masked = ops.logical_and(ops.isinf(log_true), ops.isinf(log_pred))
        log_mixture = ops.logaddexp(
            math.log(beta) + ops.where(both_masked, 0.0, log_true),
            math.log(1.0 - beta) + ops.where(both_masked, 0.0, log_pred),
        )
        terms = (1.0 - beta) * _weighted_terms(true, log_true - log_mixture)
        terms = terms + beta * _weighted_terms(pred, log_pred - log_mixture)
    return nan_gradients_where_nan(temperature**2 * ops.sum(terms, axis=axis))


def bernoulli_kl(rho: float, rho_hat: Tensor) -> Tensor:
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


def _expm1_minus_identity(x: Tensor) -> Tensor:
    """`exp(x) - 1 - x`, accurate to float rounding for every `x`, also near 0.

    The direct `expm1(x) - x` cancels for small `|x|` (the result is about
    x²/2, the operands about x, and backends' `expm1` differ by a few ulp):
    below |x| = 0.5 the Taylor polynomial up to x¹⁰ is used instead, whose
    first omitted term is below 1e-10 relative there. A
    double `where` keeps either branch's derivatives out of the other's entries.
    """
    small = ops.abs(x) < 0.5
    near = ops.where(small, x, 0.0)
    # Above 1e4 e^x is inf anyway; capping x there keeps inf - inf out of +inf.
    far = ops.where(small, 1.0, ops.where(x > 1e4, 1e4, x))
    series = 1 / math.factorial(10)
    for n in range(9, 1, -1):
        series = 1 / math.factorial(n) + near * series
    return ops.where(small, near * near * series, ops.expm1(far) - far)


def gaussian_kl(
    mean: Tensor, log_var: Tensor, prior_mean: Tensor | float, prior_log_var: Tensor | float
) -> Tensor:
    """KL(N(mean, e^log_var) ‖ N(prior_mean, e^prior_log_var)), elementwise.

    ```python
    d = log_var - prior_log_var
    kl = 0.5 * ((exp(d) - 1 - d) + (mean - prior_mean) ** 2 * exp(-prior_log_var))
    ```

    The closed form of Kingma & Welling (2014, appendix B) for one dimension,
    written as a sum of two terms that are never negative, so nothing cancels:
    `exp(d) - 1 - d` is computed without the loss of digits of the textbook
    `-(1 + d - exp(d))` near `d = 0` (see `_expm1_minus_identity`).
    """
    diff = mean - prior_mean
    spread = _expm1_minus_identity(log_var - prior_log_var)
    return 0.5 * (spread + diff * diff * ops.exp(-prior_log_var))


def gaussian_kl_divergence(
    mean: Tensor,
    log_var: Tensor,
    prior_mean: Tensor | float = 0.0,
    prior_log_var: Tensor | float = 0.0,
    axis: int = -1,
) -> Tensor:
    """KL(N(mean, diag e^log_var) ‖ N(prior_mean, diag e^prior_log_var)) summed over `axis`.

    The KL term of a variational autoencoder (Kingma & Welling, "Auto-Encoding
    Variational Bayes", 2014): the posterior q = N(mean, e^log_var) an encoder
    predicts, against the prior p, by default the standard normal N(0, 1). The
    direction is KL(q ‖ p), the one in the evidence lower bound.

    ```python
    d = log_var - prior_log_var
    kl = 0.5 * sum(exp(d) - 1 - d + (mean - prior_mean) ** 2 / exp(prior_log_var), axis)
    ```

    Numerical conventions:

    - Exact for tiny log-variances: `exp(d) - 1 - d` is a Taylor polynomial
      where |d| < 0.5 and `expm1(d) - d` elsewhere, so lv = 1e-4 gives
      lv²/4 = 2.5e-9 in float32, where the textbook `-0.5 * (1 + lv - mean² -
      exp(lv))` gives exactly 0; float32 is within 1e-5 relative of float64 for
      lv in [-20, 20] and mean in [-10, 10].
    - Nothing is clipped: a log-variance of ±inf gives +inf, a NaN gives NaN,
      and a NaN value has NaN derivatives with respect to every input.
    - float16 and bfloat16 inputs are computed in float32 and the result is
      float32: e^lv overflows float16 for lv > 11, and so can the value.
      float64 stays float64.

    Args:
        mean: the posterior means, shape `(..., latent_dim)`.
        log_var: the posterior log-variances, broadcastable to `mean`.
        prior_mean: the prior means, a float or a tensor broadcastable to `mean`.
        prior_log_var: the prior log-variances, likewise.
        axis: the latent axis, summed over.

    Returns:
        The divergence per sample: `mean`'s shape without `axis`.

    Examples:
        >>> import numpy as np
        >>> mean = np.array([[0.5, -1.0]], dtype="float32")
        >>> log_var = np.array([[0.2, -0.7]], dtype="float32")
        >>> round(float(gaussian_kl_divergence(mean, log_var)[0]), 6)
        0.733994
    """
    axis = _checks.check_axis(axis)
    mean = ops.convert_to_tensor(mean)
    dtype = computation_dtype(mean.dtype)
    mean, log_var, prior_mean, prior_log_var = (
        ops.cast(ops.convert_to_tensor(x), dtype)
        for x in (mean, log_var, prior_mean, prior_log_var)
    )
    kl = gaussian_kl(mean, log_var, prior_mean, prior_log_var)
    return nan_gradients_where_nan(ops.sum(kl, axis=axis))
