"""Kullback-Leibler divergences and their family as pure functions of tensors.

One core: each kind of input is brought to log space once (probabilities with the
0·log 0 convention; a probability target against logits, and teacher against student
logits, through one exact log ratio, `log_ratio`), and each divergence is written once per
kind over it, as a sum of non-negative terms; `DIVERGENCES` lists them, one entry per
divergence, and `divergence_values` applies what is common to all (the NaN rule, the β
endpoints, T²). Binary KL and the sparsity penalty are the two-outcome case
(`_bernoulli_terms`). Everything is `keras.ops`, so it runs unchanged on TensorFlow, JAX and
PyTorch, and every derivative is traced by the backend's own autodiff in every mode,
except the first derivatives of KL, reverse KL and Jeffreys from logits and of KL on
probabilities, which are their closed forms (`exact_kl`, `_floored_from_target`,
`_floored_distillation`, `_kl_on_probabilities`, registered per backend by
`kl_keras._kernels`; their second derivatives are traced again). Arguments are
checked by the callers (`kl_keras._shell`); nothing here holds state.

The numerical conventions users see are stated once, in `kl_keras.kl_divergence`'s
docstring; how they are kept here:

- `0 * log(0) = 0` by a double `where` (`_weighted_terms`), so neither the value nor any
  derivative sees the unused branch; nothing clips a target.
- One floor policy: a probability inside a log's denominator is floored at
  `keras.config.epsilon()` with the derivative of the unfloored value kept
  (`floor_probabilities`: a zero or an underflow gives a large finite value whose
  gradient still pulls); from logits nothing is floored but a teacher's masked (-inf)
  entry where reverse KL and Jeffreys would be infinite (log P taken as log(epsilon)).
- One NaN rule: a distribution with a negative or NaN entry has a NaN value and NaN
  derivatives with respect to every entry of both arguments (`nan_gradients_where_nan`).
- float16 and bfloat16 inputs are computed in float32 (`computation_dtype`).

Reference: S. Kullback and R. A. Leibler, "On Information and Sufficiency",
Annals of Mathematical Statistics 22(1), 1951.
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops

from kl_keras import _checks, _kernels
from kl_keras._distribute import global_sum_and_count
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


def _positive_or_nan(x: Tensor) -> Tensor:
    """`x` where positive, 1 where 0 (a weight-0 entry), NaN where negative or NaN."""
    return ops.where(x > 0, x, ops.cast(ops.where(x == 0, 1.0, float("nan")), x.dtype))


def _kl_terms(p: Tensor | float, q: Tensor, floored: bool = False) -> Tensor:
    """The terms `p * log(p / max(q, epsilon))` of KL(p ‖ q) on probabilities, elementwise.

    The log of the ratio is taken in one `log`, which is more precise than a
    difference of logs when the two distributions are close; `q` is floored with
    its derivative kept (see `floor_probabilities`) unless the caller did so already
    (`floored`). A float `p`, a constant target strictly inside (0, 1), has no zero to
    guard: the plain product, without the ops that would cost in PyTorch's eager mode.
    """
    if not floored:
        q = floor_probabilities(q)
    if isinstance(p, float):
        return p * ops.log(p / q)
    safe_p = ops.where(p == 0, 1.0, p)
    return _weighted_terms(p, ops.log(safe_p / q))


def _bernoulli_terms(
    p: Tensor | float, q_on: Tensor, q_off: Tensor, floored: bool = False
) -> Tensor:
    """KL(Bernoulli(p) ‖ Bernoulli(q)) elementwise, both outcomes: the two-outcome KL.

    `q_on` is q and `q_off` is 1 - q, given apart so that each is formed (or clipped) from
    the caller's own value: in float32, 1 - (1 - 1e-7) is 1.19e-7. Each is floored at
    epsilon as in `_kl_terms`, unless `floored`.
    """
    return _kl_terms(p, q_on, floored) + _kl_terms(1.0 - p, q_off, floored)


def _floored_log(y: Tensor) -> tuple[Tensor, Tensor]:
    """`(log(max(y, epsilon)), y < epsilon)`, the floor's derivative that of `y` itself."""
    return ops.log(floor_probabilities(y)), y < keras.config.epsilon()


# Each form below takes `(y_true, y_pred, axis, beta, temperature)` and returns one value per
# distribution with `axis` kept; `divergence_values` picks one and applies the rules common
# to all of them. On probabilities (y_pred floored at epsilon inside a log, see the module
# docstring):


def _kl_on_probabilities(p: Tensor, q: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """`sum(p * log(p / max(q, epsilon)))`, differentiated by its closed form:

    ```python
    d / d q = -p / max(q, epsilon)        # the floor's derivative that of q itself
    d / d p = log(p / max(q, epsilon)) + 1, 0 where p = 0
    ```

    A negative or NaN `q` makes its row NaN (one check of the row), also where p = 0. No
    `where` has a constant branch (in PyTorch's eager mode each is a full-size fill and
    select): the 0·log 0 guard adds an indicator of p = 0 to the ratio. On TensorFlow the
    same value is traced instead (`_kernels.traces_as_fast`), through `_kl_terms`.
    """
    if _kernels.traces_as_fast():
        invalid = ops.any(ops.logical_not(q >= 0), axis=axis, keepdims=True)
        # Added, not selected: the NaN cotangent of the row reaches every entry the value
        # depends on, and the double `where` of `_kl_terms` keeps 0 where p = 0.
        row_nan = ops.cast(ops.where(invalid, float("nan"), 0.0), q.dtype)
        return ops.sum(_kl_terms(p, q), axis=axis, keepdims=True) + row_nan

    def function(p: Tensor, q: Tensor, derivatives: bool) -> tuple[Tensor, Any, Any]:
        epsilon = keras.config.epsilon()
        lifted = q + ops.stop_gradient(epsilon - q)  # epsilon, with the derivative of q
        ratio = p / ops.where(q < epsilon, lifted, q)
        zero = ops.cast(p == 0, p.dtype)
        log_ratio = ops.log(ratio + zero)  # 0 where p = 0 (0 * log 0 = 0)
        invalid = ops.any(ops.logical_not(q >= 0), axis=axis, keepdims=True)
        value = ops.sum(p * log_ratio, axis=axis, keepdims=True)
        value = ops.where(invalid, float("nan"), value)
        if not derivatives:
            return value, None, None
        return value, log_ratio + (1.0 - zero), -ratio

    # Where p = 0 the value does not depend on q: a derivative of 0 even in a NaN row.
    return _with_closed_form(function, p, q, axis, exact_zeros=True)


def _reverse_kl_on_probabilities(p: Tensor, q: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """`sum(q * log(q / max(p, epsilon)))`: KL with the roles swapped."""
    return _kl_on_probabilities(q, p, axis, beta, t)


def _jeffreys_on_probabilities(p: Tensor, q: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """`sum((p - q) * (log(max(p, epsilon)) - log(max(q, epsilon))))`, symmetric.

    Where both are at least epsilon it is forward plus reverse KL exactly; an entry below
    epsilon differs from that sum by at most epsilon / e.
    """
    terms = (p - q) * (ops.log(floor_probabilities(p)) - ops.log(floor_probabilities(q)))
    return ops.sum(terms, axis=axis, keepdims=True)


def _jensen_shannon_on_probabilities(
    p: Tensor, q: Tensor, axis: int, beta: float, t: float
) -> Tensor:
    """(1 - beta) KL(P ‖ M) + beta KL(Q ‖ M), M = beta P + (1 - beta) Q, 0 < beta < 1.

    M > 0 wherever P or Q is, so nothing is floored.
    """
    # Where P and Q are within a factor 2 of each other (the small-JSD regime), log(P / M)
    # is -log1p((1 - beta) (Q - P) / P), and log(Q / M) likewise: no M is formed, and close
    # distributions keep their digits. Elsewhere the logs are far apart and are subtracted
    # directly, M in log space: a ratio such as P / Q would overflow for a tiny Q. Each
    # unused branch sees a finite argument (divisor 1), so no derivative leaks a NaN. A
    # negative or NaN entry is NaN in both branches; an entry of 0 has weight 0.
    safe_true, safe_pred = _positive_or_nan(p), _positive_or_nan(q)
    log_true, log_pred = ops.log(safe_true), ops.log(safe_pred)
    weighted_true = math.log(beta) + log_true
    weighted_pred = math.log(1.0 - beta) + log_pred
    log_mixture = ops.where(
        p == 0,
        weighted_pred,
        ops.where(q == 0, weighted_true, _logaddexp(weighted_true, weighted_pred)),
    )
    difference = q - p
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
    terms = (1.0 - beta) * _weighted_terms(p, log_true_ratio)
    terms = terms + beta * _weighted_terms(q, log_pred_ratio)
    return ops.sum(terms, axis=axis, keepdims=True)


def _binary_kl_on_probabilities(p: Tensor, q: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """Sum over `axis` of the two-outcome KL, `q` and `1 - q` each floored at epsilon."""
    return ops.sum(_bernoulli_terms(p, q, 1.0 - q), axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------
# From logits: one exact log ratio, then each divergence as a sum of non-negative terms.
# ---------------------------------------------------------------------------------------

# x - log1p(x) = x²/2 - x³/3 + ..., used where |x| < 0.1 (the first omitted term is below
# 1e-11 relative there).
_PSI_COEFFICIENTS = tuple(0.0 if n < 2 else (-1.0) ** n / n for n in range(13))
_SERIES_BELOW = 0.5  # |x| below which e^x - 1 - x is a series (see _expm1_minus_identity)
# (e^x - 1 - x) / x² = 1/2! + x/3! + ... + x⁸/10!, its series for |x| < 0.5.
_PHI_COEFFICIENTS = tuple(1.0 / math.factorial(n + 2) for n in range(9))
_SMALL_KL = 0.1


def _polynomial(x: Tensor, coefficients: tuple[float, ...]) -> Tensor:
    """`sum(c * x**n for n, c in enumerate(coefficients))`, by Horner's rule."""
    result: Any = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = c + x * result
    return result


def _phi_series(x: Tensor) -> Tensor:
    """`e^x - 1 - x` by its Taylor polynomial to x¹⁰, for |x| < 0.5 (`_expm1_minus_identity`)."""
    return x * x * _polynomial(x, _PHI_COEFFICIENTS)


def _two_difference(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """`b - a` as `hi + lo`: `hi = fl(b - a)` and `lo` its rounding error, exactly (TwoSum).

    Where the two rows differ by a large constant (student logits shifted against the
    teacher's), `hi` alone carries half an ulp of that constant into every entry. Every
    op is an addition, so the derivative of `hi + lo` is exactly that of `b - a` in every
    autodiff mode. `lo` is 0 where `hi` is not finite.
    """
    hi = b - a
    b_virtual = hi + a
    a_virtual = b_virtual - hi
    lo = (b - b_virtual) - (a - a_virtual)
    return hi, ops.where(ops.isfinite(hi), lo, 0.0)


def _logaddexp(x: Tensor, y: Tensor) -> Tensor:
    """`log(e^x + e^y)` in the dtype of its inputs (Keras's torch `logaddexp` and `maximum`
    compute float64 in float32), -inf where both are -inf, with finite derivatives there."""
    larger = ops.where(x > y, x, y)
    smaller = ops.where(x > y, y, x)
    both_zero = larger == float("-inf")
    gap = ops.where(both_zero, 0.0, smaller - larger)
    return ops.where(both_zero, larger, larger + ops.log1p(ops.exp(gap)))


class LogRatio(NamedTuple):
    """P and Q along one axis, brought to log space with their log ratio exact.

    `log_p` is log P (P normalized from its log-weights, -inf where P = 0), `log_q` is log Q
    and `q` is Q, `log_ratio` is log(Q / P) (0 where P = 0), `q_minus_p` is Q - P (exact
    where the rows are close), and `kl` is KL(P ‖ Q) per distribution (the axis kept).
    """

    log_p: Tensor
    p: Tensor
    log_q: Tensor
    q: Tensor
    log_ratio: Tensor
    q_minus_p: Tensor
    kl: Tensor


def _finite_peak(x: Tensor, axis: int) -> Tensor:
    """The max of `x` along `axis` (kept), 0 where it is not finite, held out of derivatives."""
    peak = ops.max(x, axis=axis, keepdims=True)
    return ops.stop_gradient(ops.where(ops.isfinite(peak), peak, ops.zeros_like(peak)))


def log_ratio(
    target_log_weights: Tensor, logits: Tensor, axis: int, temperature: float = 1.0
) -> LogRatio:
    """P = softmax(a / T) and Q = softmax(b / T), exact where they are close.

    The core of every divergence from logits. Each row is shifted by its own max before
    dividing by T (so a constant added to a row changes nothing), and the two rows meet in
    their difference `d = (b - a) / T` (exact, see `_two_difference`), centred on
    `d̄ = sum(p * d)`: with `u = d - d̄`, Q / P = e^u / sum(p * e^u), and

    ```python
    kl = log(sum(p * e**u)) - sum(p * u) = log1p(S + g) - g
    S = sum(p * (e**u - 1 - u))  # >= 0, a series near u = 0
    g = sum(p * u)               # 0 but for the rounding of d̄
    ```

    For small KL it is `S - (x - log1p(x))`, x = S + g, a series in x: the rounding in d̄
    cancels, and nothing is rounded in common between the rows (the shared log-sum-exp
    rounding that makes the usual log-softmax difference lose its digits at KL ≈ 1e-6).
    Two exponentials per entry, one of each row shifted by its max (so no logit overflows
    anything): P's, and Q's numerators `e^((b - max b) / T)`, which are also `p * e^u` up
    to a constant of the row, used where |u| >= 0.5 (the series is used below). Q - P
    near u = 0 is `(p * (e^u - 1) - p * expm1(L)) * e^-L`, L = log(sum(p * e^u)), from
    the same series, so it keeps its digits where the plain difference would lose them.
    The centre and the scale are constants of the formula (any value gives the same
    function), held out of the derivatives.
    """
    peak = _finite_peak(target_log_weights, axis)
    logits_peak = _finite_peak(logits, axis)
    shifted = (target_log_weights - peak) / temperature
    exp_shifted = ops.exp(shifted)
    sum_exp = ops.sum(exp_shifted, axis=axis, keepdims=True)
    log_sum = ops.log(sum_exp)
    log_p = shifted - log_sum
    masked = log_p == float("-inf")
    p = exp_shifted / sum_exp
    hi, lo = _two_difference(logits, target_log_weights)
    hi = ops.where(masked, 0.0, hi)
    # Centred before dividing by T: hi - centre is exact where the rows are close, and a
    # difference of a row's constant divided by T would round in every entry.
    centre = ops.stop_gradient(ops.sum(p * hi, axis=axis, keepdims=True))
    u = ops.where(masked, 0.0, ((hi - centre) + lo) / temperature)
    # Q's numerators; p * e^u = student * e^scale (where P = 0: the student's own mass).
    student_shifted = (logits - logits_peak) / temperature
    student = ops.exp(student_shifted)
    student_sum = ops.sum(student, axis=axis, keepdims=True)
    # log(max(p * e^u)), from the rows' maxima (no pass of its own).
    # max b - max a split as hi + lo like d, so that d̄ is taken off it exactly.
    peaks_hi, peaks_lo = _two_difference(logits_peak, peak)
    scale = ((peaks_hi - centre) + peaks_lo) / temperature - log_sum
    usable = ops.logical_and(ops.isfinite(scale), scale > 0)
    scaled = ops.stop_gradient(ops.where(usable, scale, ops.zeros_like(scale)))
    descale = ops.exp(-scaled)
    near = ops.logical_and(ops.abs(u) < _SERIES_BELOW, ops.logical_not(masked))
    near_u = ops.where(near, u, 0.0)
    near_terms = p * _phi_series(near_u)  # p * (e^u - 1 - u)
    far_terms = student * ops.exp(scale - scaled) - p * (1.0 + u) * descale
    terms = ops.where(near, near_terms * descale, far_terms)
    # Divided by sum(p), 1 but for the rounding of log P (one ulp of the log-sum-exp,
    # shared by the whole row), which would otherwise scale KL by 1 + that rounding.
    weight = ops.sum(p, axis=axis, keepdims=True)
    total = ops.sum(terms, axis=axis, keepdims=True) / weight
    drift = ops.sum(p * u, axis=axis, keepdims=True) / weight
    x = total + drift
    is_scaled = scaled > 0
    log_total = ops.where(
        is_scaled, scaled + ops.log(descale * (1.0 + drift) + total), ops.log1p(x)
    )
    small = ops.logical_and(ops.logical_not(is_scaled), ops.abs(x) < _SMALL_KL)
    psi = _polynomial(ops.where(small, x, 0.0), _PSI_COEFFICIENTS)
    kl = ops.where(small, total - psi, log_total - drift)
    # A student log-probability of -inf where the teacher has mass: KL is +inf.
    lost = ops.logical_and(logits == float("-inf"), p > 0)
    kl = ops.where(ops.any(lost, axis=axis, keepdims=True), float("inf"), kl)
    kl = ops.where(kl < 0, 0.0, kl)  # rounding below 0 (never in a test); NaN is kept
    q = student / student_sum
    log_q = student_shifted - ops.log(student_sum)
    # Q - P = P (e^ℓ - 1), ℓ = u - L: (p (e^u - 1) - p expm1(L)) e^-L near u = 0 (L < log V
    # in a row that is not scaled), the plain difference elsewhere (no cancellation there).
    exact = ops.logical_and(near, ops.logical_not(is_scaled))
    near_log_total = ops.where(is_scaled, 0.0, log_total)
    close_difference = (near_terms + p * near_u - p * ops.expm1(near_log_total)) * ops.exp(
        -near_log_total
    )
    q_minus_p = ops.where(exact, close_difference, q - p)
    ell = ops.where(masked, 0.0, u - log_total)
    return LogRatio(log_p, p, log_q, q, ell, q_minus_p, kl)


def _kl_and_derivatives(
    a: Tensor, b: Tensor, derivatives: bool, axis: int, temperature: float
) -> tuple[Tensor, Any, Any]:
    """KL(softmax(a / T) ‖ softmax(b / T)) per row and, when asked, its derivatives:

    ```python
    d kl / d b = (q - p) / T
    d kl / d a = -p * (log(q / p) + kl) / T
    ```
    """
    core = log_ratio(a, b, axis, temperature)
    if not derivatives:
        return core.kl, None, None
    d_a = -core.p * (core.log_ratio + core.kl) / temperature
    return core.kl, d_a, core.q_minus_p / temperature


def _with_closed_form(
    function: _kernels.ValueAndDerivatives,
    a: Tensor,
    b: Tensor,
    axis: int,
    exact_zeros: bool = False,
) -> Tensor:
    """`function`'s value, differentiated by its closed form (`_kernels.with_derivatives`)."""
    if tuple(a.shape) != tuple(b.shape):
        a, b = a + ops.zeros_like(b), b + ops.zeros_like(a)
    return _kernels.with_derivatives(function, a, b, axis, exact_zeros)


def exact_kl(a: Tensor, b: Tensor, axis: int, temperature: float = 1.0) -> Tensor:
    """`log_ratio(a, b, axis, temperature).kl`, differentiated by its closed form.

    The same value; its first derivatives come from `_kl_and_derivatives` (registered with
    each backend's autodiff by `_kernels.with_derivatives`) instead of being traced back
    through the core (what that saves on each backend: BENCHMARKS.md).
    """

    def function(a: Tensor, b: Tensor, derivatives: bool) -> tuple[Tensor, Any, Any]:
        return _kl_and_derivatives(a, b, derivatives, axis, temperature)

    return _with_closed_form(function, a, b, axis)


def _weighted_phi(weight: Tensor, y: Tensor, weighted_exp: Tensor) -> Tensor:
    """`weight * (e^y - 1 - y)` where `weight * e^y = weighted_exp`: 0 where both are 0.

    A series near y = 0; elsewhere `weighted_exp - weight - weight * y`, which never
    overflows (`weight * e^y` is a probability) and is `weighted_exp` where `weight` is 0.
    """
    near = ops.logical_and(weight > 0, ops.abs(y) < _SERIES_BELOW)
    series = weight * _expm1_minus_identity(ops.where(near, y, 0.0))
    linear = ops.where(weight == 0, 0.0, weight * ops.where(weight == 0, 0.0, 1.0 + y))
    return ops.where(near, series, weighted_exp - linear)


def _times_log_gap(weight: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """`weight * (log_a - log_b)`, 0 where `weight` is 0 (whatever the logs)."""
    zero = weight == 0
    return weight * ops.where(zero, 0.0, log_a - ops.where(zero, 0.0, log_b))


def _reverse_terms(
    p: Tensor, q: Tensor, log_p: Tensor, log_q: Tensor, ell: Tensor, floored: Tensor
) -> Tensor:
    """Per entry q·φ(-ℓ) = p - q + q·ℓ, with log p replaced by its floor where `floored`.

    Summed, KL(Q ‖ P) less (Σq - Σp); every term >= 0 where nothing is floored.
    """
    exact = _weighted_phi(q, -ell, p)
    plain = (p - q) + _times_log_gap(q, log_q, log_p)
    near = ops.logical_and(ops.logical_not(floored), ops.abs(ell) < _SERIES_BELOW)
    return ops.where(near, exact, plain)


def _jeffreys_terms(
    p: Tensor, q: Tensor, log_p: Tensor, log_q: Tensor, ell: Tensor, floored: Tensor
) -> Tensor:
    """Per entry (q - p)·(log q - log p) = p·ℓ·(e^ℓ - 1) >= 0, log p floored where `floored`."""
    near = ops.logical_and(ops.logical_not(floored), ops.abs(ell) < _SERIES_BELOW)
    exact = p * ell * ops.expm1(ops.where(near, ell, 0.0))
    difference = q - p
    plain = _times_log_gap(difference, log_q, log_p)
    return ops.where(near, exact, plain)


def _jensen_shannon_terms(
    p: Tensor, q: Tensor, log_p: Tensor, log_q: Tensor, ell: Tensor, beta: float
) -> Tensor:
    """Per entry (1 - β)·p·φ(log(m / p)) + β·q·φ(log(m / q)), M = βP + (1 - β)Q.

    Summed, the Jensen-Shannon divergence less (2β - 1)(Σp - Σq). Near ℓ = 0,
    log(m / p) = log1p((1 - β)·expm1(ℓ)) keeps its digits; elsewhere log M is a log-space
    sum of the two weighted log-probabilities.
    """
    near = ops.logical_and(p > 0, ops.abs(ell) < _SERIES_BELOW)
    near_ell = ops.where(near, ell, 0.0)
    log_m_over_p = ops.log1p((1.0 - beta) * ops.expm1(near_ell))
    log_m = ops.where(
        near,
        log_p + log_m_over_p,
        _logaddexp(math.log(beta) + log_p, math.log(1.0 - beta) + log_q),
    )
    m = ops.exp(log_m)
    finite_m = ops.where(log_m == float("-inf"), 0.0, log_m)
    toward_p = ops.where(near, log_m_over_p, finite_m - ops.where(p > 0, log_p, 0.0))
    toward_q = ops.where(near, log_m_over_p - near_ell, finite_m - ops.where(q > 0, log_q, 0.0))
    return (1.0 - beta) * _weighted_phi(p, toward_p, m) + beta * _weighted_phi(q, toward_q, m)


def _target_log_weights(y_true: Tensor) -> Tensor:
    """log(y_true): -inf where it is 0, NaN where it is negative or NaN."""
    zero = y_true == 0
    return ops.where(zero, float("-inf"), ops.log(ops.where(zero, 1.0, y_true)))


class _TargetRatio(NamedTuple):
    """A probability target p (any sum) against softmax(logits), in log space."""

    p: Tensor
    log_p: Tensor  # log p itself (not normalized): -inf where p = 0
    q: Tensor
    log_q: Tensor
    log_ratio: Tensor  # log(q / p) where p > 0, 0 where p = 0
    core: LogRatio
    mass: Tensor  # sum(p), the axis kept
    excess: Tensor  # sum(p) - 1


def _target_mass(y_true: Tensor, axis: int) -> Tensor:
    """sum(y_true) over `axis`, kept: the Z of a probability target that need not sum to 1.

    A float32 sum near 1 resolves Z - 1 only to its ulp (6e-8 below 1, 1.2e-7 above), the
    limit of the plain formula's term in it for a rounded target (the guide). Zero targets
    enter the sum times 0: their gradient is 0 (0·log 0 = 0), and NaN when the
    distribution's value is NaN (a `where` would give them 0 there on some backends).
    """
    nonzero = ops.cast(y_true != 0, y_true.dtype)
    return ops.sum(y_true * nonzero, axis=axis, keepdims=True)


def _against_target(y_true: Tensor, logits: Tensor, axis: int) -> _TargetRatio:
    log_p = _target_log_weights(y_true)
    core = log_ratio(log_p, logits, axis)
    q = core.q
    mass = _target_mass(y_true, axis)
    excess = mass - 1.0
    # log(q / p) of the plain (unnormalized) p: the normalized ratio less log(sum(p)).
    ell = ops.where(y_true == 0, 0.0, core.log_ratio - ops.log1p(excess))
    return _TargetRatio(y_true, log_p, q, core.log_q, ell, core, mass, excess)


def _kl_on_target(y: Tensor, logits: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """KL(y ‖ softmax(logits)) = sum(y * (log(y) - log_softmax(logits))).

    With Z = sum(y) it is Z·KL(y / Z ‖ Q) + Z·log(Z): the first term from the exact core
    (`log_ratio`), the second 0 for a target that sums to 1 and otherwise the plain
    formula's value for unnormalized targets. Nothing is clipped; a logit of -inf is allowed
    wherever `y` is 0 (a masked class).
    """
    mass = _target_mass(y, axis)
    kl = exact_kl(_target_log_weights(y), logits, axis)
    return mass * kl + mass * ops.log1p(mass - 1.0)


def _log_gap(
    q_is_zero: Tensor, log_q: Tensor, log_floor: Tensor, ell: Tensor, floored: Tensor
) -> Tensor:
    """g = log q - log p̂ (p̂: p floored where `floored`): ℓ (exact) where nothing is floored,
    0 where q = 0 (its weight)."""
    return ops.where(q_is_zero, 0.0, ops.where(floored, log_q - log_floor, ell))


def _floored_terms(
    divergence: str,
    p: Tensor,
    q: Tensor,
    log_floor: Tensor,
    log_q: Tensor,
    ell: Tensor,
    floored: Tensor,
    axis: int,
) -> Tensor:
    """Sum over `axis` of the reverse KL or Jeffreys terms (see `_reverse_terms`)."""
    form = _reverse_terms if divergence == "reverse_kl" else _jeffreys_terms
    return ops.sum(form(p, q, log_floor, log_q, ell, floored), axis=axis, keepdims=True)


def _floored_from_target(divergence: str, y_true: Tensor, logits: Tensor, axis: int) -> Tensor:
    """Reverse KL or Jeffreys of a probability target against softmax(logits), per row, with
    the closed-form derivatives (R = the reverse KL, g = log q - log max(y, ε), Y = sum(y)):

    ```python
    reverse:  d / d logits = q * (g - R)                        d / d y = -q / max(y, ε)
    jeffreys: d / d logits = q * (g - R) + q * (Y - 1) + (q - y)  d / d y = -g - (q - y) / max(y, ε)
    ```
    """

    def function(y_true: Tensor, logits: Tensor, derivatives: bool) -> tuple[Tensor, Any, Any]:
        t = _against_target(y_true, logits, axis)
        log_floor, floored = _floored_log(y_true)
        value = _floored_terms(divergence, t.p, t.q, log_floor, t.log_q, t.log_ratio, floored, axis)
        if divergence == "reverse_kl":
            value = value - t.excess  # the terms add sum(y) - 1 (see `_reverse_terms`)
        if not derivatives:
            return value, None, None
        q_is_zero = t.log_q == float("-inf")
        gap = _log_gap(q_is_zero, t.log_q, log_floor, t.log_ratio, floored)
        if divergence == "reverse_kl":
            return value, -ops.where(q_is_zero, 0.0, ops.exp(gap)), t.q * (gap - value)
        reverse = ops.sum(t.q * gap, axis=axis, keepdims=True)
        difference = t.core.q_minus_p - t.p * t.excess / t.mass  # q - y, y unnormalized
        d_logits = t.q * (gap - reverse) + t.q * t.excess + difference
        return value, -gap - difference / ops.exp(log_floor), d_logits

    return _with_closed_form(function, y_true, logits, axis)


def _floored_distillation(
    divergence: str, teacher: Tensor, student: Tensor, axis: int, temperature: float
) -> Tensor:
    """Reverse KL or Jeffreys of softmax(teacher / T) and softmax(student / T) per row, log P
    floored at log ε where it is -inf, with the closed-form derivatives (R = the reverse KL,
    g = log q - log p̂, m = the student's mass on the floored entries):

    ```python
    reverse:  d / d student = q * (g - R) / T     d / d teacher = -((q - p) + p * m) / T
    jeffreys: those plus KL's, (q - p) / T and -p * (log(q / p) + KL) / T
    ```
    (d / d teacher is 0 on the floored entries.)
    """

    def function(a: Tensor, b: Tensor, derivatives: bool) -> tuple[Tensor, Any, Any]:
        core = log_ratio(a, b, axis, temperature)
        p, q = core.p, core.q
        floored = core.log_p == float("-inf")
        log_floor = ops.where(floored, math.log(keras.config.epsilon()), core.log_p)
        value = _floored_terms(
            divergence, p, q, log_floor, core.log_q, core.log_ratio, floored, axis
        )
        if not derivatives:
            return value, None, None
        q_is_zero = core.log_q == float("-inf")
        gap = _log_gap(q_is_zero, core.log_q, log_floor, core.log_ratio, floored)
        difference = core.q_minus_p
        reverse = value
        if divergence == "jeffreys":
            reverse = ops.sum(q * gap, axis=axis, keepdims=True)
        masked_mass = ops.sum(ops.where(floored, q, 0.0), axis=axis, keepdims=True)
        d_b = q * (gap - reverse)
        d_a = ops.where(floored, 0.0, -difference - p * masked_mass)
        if divergence == "jeffreys":
            d_b = d_b + difference
            d_a = d_a - p * (core.log_ratio + core.kl)
        return value, d_a / temperature, d_b / temperature

    return _with_closed_form(function, teacher, student, axis)


def _reverse_kl_on_target(y: Tensor, logits: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """KL(softmax(logits) ‖ y), `y` floored at epsilon inside the log, as
    sum(q·φ(log(y / q))) + 1 - sum(y): a sum of non-negative terms (see `log_ratio`)."""
    return _floored_from_target("reverse_kl", y, logits, axis)


def _jeffreys_on_target(y: Tensor, logits: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """sum((y - q) * (log(max(y, epsilon)) - log_softmax(logits))), each term p·ℓ·(e^ℓ - 1)."""
    return _floored_from_target("jeffreys", y, logits, axis)


def _jensen_shannon_on_target(
    y: Tensor, logits: Tensor, axis: int, beta: float, t: float
) -> Tensor:
    """(1 - beta) KL(y ‖ M) + beta KL(Q ‖ M), Q = softmax(logits), M in log space."""
    target = _against_target(y, logits, axis)
    terms = _jensen_shannon_terms(
        target.p, target.q, target.log_p, target.log_q, target.log_ratio, beta
    )
    correction = (2.0 * beta - 1.0) * target.excess
    return ops.sum(terms, axis=axis, keepdims=True) - correction


def _binary_kl_on_target(y: Tensor, logits: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """Binary KL against `sigmoid(logits)`, summed over `axis`: the two-outcome case.

    Per entry p·φ(ℓ₁) + (1 - p)·φ(ℓ₀), ℓ₁ = log(q / p), ℓ₀ = log((1 - q) / (1 - p)),
    q = sigmoid(z). Near q = p both come from e = z - logit(p), as log1p(sigmoid(-z) ·
    expm1(e)) and log1p(sigmoid(z)·expm1(-e)), so close distributions keep their digits;
    elsewhere they are differences of log-sigmoids. Nothing is clipped.
    """
    log_on, log_off = _kernels.log_sigmoids(logits)
    log_true_on = _target_log_weights(y)
    log_true_off = ops.log1p(-y)  # the log of 1 - y itself, not of its rounding
    e = logits - (log_true_on - log_true_off)
    near = ops.abs(e) < _SERIES_BELOW
    near_e = ops.where(near, e, 0.0)
    q_on, q_off = ops.exp(log_on), ops.exp(log_off)
    ell_on = ops.where(near, ops.log1p(q_off * ops.expm1(near_e)), log_on - log_true_on)
    ell_off = ops.where(near, ops.log1p(q_on * ops.expm1(-near_e)), log_off - log_true_off)
    terms = _weighted_phi(y, ell_on, q_on) + _weighted_phi(1.0 - y, ell_off, q_off)
    return ops.sum(terms, axis=axis, keepdims=True)


# Teacher against student logits, P = softmax(a / T) and Q = softmax(b / T) (T² is applied
# by `divergence_values`). Teacher logits of -inf (masked entries) are exact for KL and
# Jensen-Shannon; for reverse KL and Jeffreys the true value is infinite wherever the
# student puts mass there, so log P of a masked entry is taken as log(epsilon) (derivative
# 0): the probabilities' floor, in log space, and only there (a finite logit keeps its own
# log P, however small).


def _kl_on_logits(a: Tensor, b: Tensor, axis: int, beta: float, t: float) -> Tensor:
    return exact_kl(a, b, axis, t)


def _reverse_kl_on_logits(a: Tensor, b: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """sum(q·φ(-ℓ)), KL(Q ‖ P)."""
    return _floored_distillation("reverse_kl", a, b, axis, t)


def _jeffreys_on_logits(a: Tensor, b: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """sum(p·ℓ·(e^ℓ - 1)), KL(P ‖ Q) + KL(Q ‖ P)."""
    return _floored_distillation("jeffreys", a, b, axis, t)


def _jensen_shannon_on_logits(a: Tensor, b: Tensor, axis: int, beta: float, t: float) -> Tensor:
    """sum((1 - beta)·p·φ(log(m / p)) + beta·q·φ(log(m / q))), M = beta P + (1 - beta) Q."""
    core = log_ratio(a, b, axis, t)
    p, q = core.p, core.q
    terms = _jensen_shannon_terms(p, q, core.log_p, core.log_q, core.log_ratio, beta)
    return ops.sum(terms, axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------
# The family: one entry per divergence, one form per kind of input.
# ---------------------------------------------------------------------------------------

# (y_true, y_pred, axis, beta, temperature) -> one value per distribution, `axis` kept.
Form = Callable[[Tensor, Tensor, int, float, float], Tensor]


class Divergence(NamedTuple):
    """One divergence of the family: its form for each kind of input.

    `probabilities`: P and Q are probabilities; `target`: P probabilities, Q the softmax
    (sigmoid for binary KL) of logits; `logits`: both softmaxes of logits at a temperature,
    None where the divergence is not one of distillation.
    """

    probabilities: Form
    target: Form
    logits: Form | None


DIVERGENCES = {
    "kl": Divergence(_kl_on_probabilities, _kl_on_target, _kl_on_logits),
    "reverse_kl": Divergence(
        _reverse_kl_on_probabilities, _reverse_kl_on_target, _reverse_kl_on_logits
    ),
    "jeffreys": Divergence(_jeffreys_on_probabilities, _jeffreys_on_target, _jeffreys_on_logits),
    "jensen_shannon": Divergence(
        _jensen_shannon_on_probabilities, _jensen_shannon_on_target, _jensen_shannon_on_logits
    ),
    "binary_kl": Divergence(_binary_kl_on_probabilities, _binary_kl_on_target, None),
}
DISTILLATION_DIVERGENCES = tuple(name for name, d in DIVERGENCES.items() if d.logits)
KINDS = ("probabilities", "target", "logits")


def divergence_values(
    name: str,
    kind: str,
    y_true: Tensor,
    y_pred: Tensor,
    axis: int,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """D(y_true ‖ y_pred) of the divergence `name`, one value per distribution (`axis` removed).

    `kind` (one of `KINDS`) says what the inputs hold; with `"logits"` the value is
    `temperature**2 * D(softmax(y_true / T) ‖ softmax(y_pred / T))`. The rules common to
    the family are applied here, once: `beta` 0 and 1 make the Jensen-Shannon divergence
    forward and reverse KL exactly (with their floors), and a NaN value carries NaN
    derivatives (`nan_gradients_where_nan`). The arguments were checked by the caller.
    """
    if name == "jensen_shannon" and beta in (0.0, 1.0):
        name = "kl" if beta == 0.0 else "reverse_kl"
    form = getattr(DIVERGENCES[name], kind)
    values = form(y_true, y_pred, axis, beta, temperature)
    if kind == "logits":
        values = temperature**2 * values
    return nan_gradients_where_nan(ops.squeeze(values, axis=axis))


def sparsity_penalty(
    x: Tensor, rho: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Σ_j KL(Bernoulli(ρ) ‖ Bernoulli(ρ̂_j)) for activations `x` of shape `(batch, ..., units)`.

    ```python
    rho_hat = mean(x, axis=every axis but the last)   # over the entries `mask` keeps
    penalty = sum(rho * log(rho / rho_hat) + (1 - rho) * log((1 - rho) / (1 - rho_hat)))
    ```

    The two-outcome KL (`_bernoulli_terms`) with ρ̂ and 1 - ρ̂ each clipped to
    `[epsilon, 1 - epsilon]` with the derivative kept (see `clip_keep_gradient`), so
    saturated or out-of-range means give a large finite penalty that still has a gradient.
    ρ̂_j is the mean over the global batch under `tf.distribute`; `mask`, of the shape of
    `x` without its last axis (a sequence's `(batch, time)` padding mask), leaves the
    positions where it is 0 out of ρ̂. Returns the penalty (a scalar, float32 for
    float16/bfloat16 activations; 0, with a zero gradient, when nothing is counted), the
    sums of the activations per unit and the number of entries in each sum.
    """
    x = ops.convert_to_tensor(x)
    if len(x.shape) == 0:
        raise ValueError(
            "KLActivityRegularizer expects activations of rank >= 1, "
            f"(batch, ..., units). Received: x.shape={tuple(x.shape)}"
        )
    x = ops.cast(x, computation_dtype(x.dtype))
    mean_axes = tuple(range(max(len(x.shape) - 1, 1)))
    weights = None
    if mask is not None:
        weights = ops.cast(mask, x.dtype)
        if len(x.shape) > 1:
            weights = ops.expand_dims(weights, -1)
    total, count = global_sum_and_count(x, axis=mean_axes, weights=weights)
    # An empty batch has no mean activation and adds nothing: 0, with a zero gradient.
    rho_hat = total / ops.where(count > 0, count, 1.0)
    epsilon = keras.config.epsilon()
    on = clip_keep_gradient(rho_hat, epsilon, 1.0 - epsilon)
    off = clip_keep_gradient(1.0 - rho_hat, epsilon, 1.0 - epsilon)
    kl = _bernoulli_terms(rho, on, off, floored=True)
    penalty = ops.where(count > 0, ops.sum(kl), 0.0)
    return penalty, total, count


def _expm1_minus_identity(x: Tensor) -> Tensor:
    """`exp(x) - 1 - x`, accurate to float rounding for every `x`, also near 0.

    The direct `expm1(x) - x` cancels for small `|x|` (the result is about
    x²/2, the operands about x, and backends' `expm1` differ by a few ulp):
    below |x| = 0.5 the Taylor polynomial up to x¹⁰ is used instead, whose
    first omitted term is below 1e-10 relative there. A
    double `where` keeps either branch's derivatives out of the other's entries.
    """
    small = ops.abs(x) < _SERIES_BELOW
    near = ops.where(small, x, 0.0)
    # Above 1e4 e^x is inf anyway; capping x there keeps inf - inf out of +inf.
    far = ops.where(small, 1.0, ops.where(x > 1e4, 1e4, x))
    return ops.where(small, _phi_series(near), ops.expm1(far) - far)


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
