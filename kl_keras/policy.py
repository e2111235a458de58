"""KL penalties for policy optimisation: the per-token estimators of RL fine-tuning, with the
gradients they give stated, and the exact KL over the vocabulary.

A policy π is kept near a reference π_ref with a KL term computed from the log-probabilities
of sampled tokens (log r = log π_ref(x) - log π(x), x ~ π), the estimators of J. Schulman,
"Approximating KL divergence" (2020); their gradients as losses are those of Y. Tang and
R. Munos, "On a few pitfalls in KL divergence gradient estimation for RL" (2025,
arXiv:2506.09477). `policy_kl_from_logits` is the exact KL(π ‖ π_ref) over the vocabulary,
from the core's close-distribution forms; `sequence_policy_kl` is the same from hidden
states and a head, chunk by chunk (`kl_keras.distillation.sequence_distillation_loss`).
"""

import math
from typing import Any

import keras
from keras import ops

from kl_keras import _checks, _distribute
from kl_keras import divergence as core
from kl_keras._types import Config, Tensor
from kl_keras.distillation import sequence_distillation_loss

ESTIMATORS = ("k1", "k2", "k3", "abs")
# verl's names for the same estimators (`core_algos.kl_penalty`), and Tunix's "mse_kl".
ALIASES = {"kl": "k1", "mse": "k2", "mse_kl": "k2", "low_var_kl": "k3"}
REDUCTIONS = ("token_mean", "sequence_sum", "sequence_mean", "none")


def _check_estimator(value: Any) -> tuple[str, bool]:
    """(the estimator's canonical name, whether it is a "+" variant)."""
    names = [*ESTIMATORS, *ALIASES]
    accepted = ", ".join(repr(n + plus) for n in names for plus in ("", "+"))
    if not isinstance(value, str):
        raise TypeError(
            f"Invalid type for argument `estimator`. Expected one of {accepted}. "
            f"Received: estimator={value!r} of type {type(value).__name__}"
        )
    plus = value.endswith("+")
    base = ALIASES.get(value[:-1] if plus else value, value[:-1] if plus else value)
    if base not in ESTIMATORS:
        raise ValueError(
            f"Invalid value for argument `estimator`. Expected one of {accepted}. "
            f"Received: estimator={value!r}"
        )
    return base, plus


def _check_clip(value: Any) -> tuple[float, float] | None:
    """None, or a pair (low, high) of numbers with low < high (either may be infinite)."""
    if value is None:
        return None
    expected = "None or a pair (low, high) of numbers with low < high"
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(
            f"Invalid type for argument `clip`. Expected {expected}. Received: clip={value!r}"
        )
    low, high = (
        _checks.check_real("clip", v, expected, lambda v: not math.isnan(v)) for v in value
    )
    if not low < high:
        raise ValueError(
            f"Invalid value for argument `clip`. Expected {expected}. Received: clip={value!r}"
        )
    return low, high


def _estimate(estimator: str, log_r: Tensor) -> Tensor:
    """The estimator's value at each log r = log π_ref(x) - log π(x)."""
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    if estimator == "k3":  # e^log_r - 1 - log_r, exact near 0 (a series there)
        return core._expm1_minus_identity(log_r)
    return ops.abs(log_r)


def _clipped_estimate(estimator: str, log_r: Tensor, clip: tuple[float, float] | None) -> Tensor:
    """The estimate, clamped to `clip` with a zero derivative outside it (as `torch.clamp`).

    Outside the interval the estimator is never differentiated (its own derivative there
    can be infinite, e^log_r for k3, and inf · 0 would be NaN): which entries are inside
    is decided on the value alone, and only those enter the differentiated estimate. NaN
    counts as inside, so it stays NaN with NaN derivatives.
    """
    if clip is None:
        return _estimate(estimator, log_r)
    low, high = clip
    probe = _estimate(estimator, ops.stop_gradient(log_r))
    inside = ops.logical_not(ops.logical_or(probe < low, probe > high))
    kept = _estimate(estimator, ops.where(inside, log_r, 0.0))
    return ops.where(inside, kept, ops.where(probe < low, low, high))


def _token_mask(mask: Any, shape: tuple[Any, ...], name: str = "mask") -> Tensor:
    """`mask` as a tensor; a `ValueError` naming `name` if it cannot broadcast to `shape`."""
    mask = ops.convert_to_tensor(mask)
    try:
        _checks.broadcast_rank(tuple(mask.shape), shape)
    except ValueError:
        raise ValueError(
            f"Invalid `{name}`: expected a shape that broadcasts to the log-probabilities' "
            f"{shape}. Received shape {tuple(mask.shape)}."
        ) from None
    return mask


def policy_kl(
    log_probs: Tensor,
    ref_log_probs: Tensor,
    estimator: str = "k3+",
    mask: Tensor | None = None,
    clip: tuple[float, float] | None = None,
    importance_ratio: Tensor | None = None,
) -> Tensor:
    """Per-token estimates of KL(π ‖ π_ref) from the log-probabilities of sampled tokens.

    For RL fine-tuning (PPO, GRPO, RLOO): `log_probs` are log π(x) of the tokens the
    policy sampled, `ref_log_probs` the reference's log π_ref(x) of the same tokens.
    With log r = log π_ref(x) - log π(x):

    ```python
    k1  = -log_r                         # "k1", verl's "kl"
    k2  = 0.5 * log_r**2                 # "k2", verl's "mse"
    k3  = exp(log_r) - 1 - log_r         # "k3", verl's "low_var_kl" (TRL's GRPO)
    abs = abs(log_r)                     # "abs"
    ```

    All of them estimate the reverse KL(π ‖ π_ref) (k1 and k3 without bias, k2 and
    abs with a bias that vanishes to second order as π → π_ref; k2, k3 and abs are
    never negative). Used *as a loss* and differentiated with the samples held fixed,
    their expected gradients on-policy differ:

    | estimator | E[gradient] as a loss | times a ratio π/π_old that carries the gradient |
    |---|---|---|
    | `"k1"` | 0 (E[∇ log π] = 0) | ∇KL(π ‖ π_ref) |
    | `"k2"` | ∇KL(π ‖ π_ref) | ∇E_π[k2] (not a KL) |
    | `"k3"` | ∇KL(π_ref ‖ π), the *forward* KL | ∇KL(π ‖ π_ref) |
    | `"abs"` | E[sign(log π - log π_ref) ∇ log π] | — |
    | any `"+"` | ∇KL(π ‖ π_ref) | ∇KL(π ‖ π_ref) |

    A `"+"` variant (verl's suffix) has the value of its estimator and the gradient of
    k2: `k + (k2 - stop_gradient(k2))`, exactly k in value. The default `"k3+"` logs
    the non-negative, unbiased, low-variance k3 that TRL and verl log, and its gradient
    is that of the reverse KL the penalty means; plain `"k3"` as a loss (TRL's GRPO,
    verl's `"low_var_kl"`) pushes π toward π_ref along the forward KL instead. Used as a
    reward (detached, REINFORCE: `-β · stop_gradient(k1) · log π`), k1 gives
    -β ∇KL(π ‖ π_ref) in expectation.

    Numerical conventions:

    - k3 is exact near log r = 0 (a series below |log r| = 0.5), where the plain
      `exp(log_r) - 1 - log_r` loses every digit in float32 below log r ≈ 1e-4; log r
      itself is exact there (the difference of two float32 numbers within a factor 2).
    - `clip=None` clamps nothing (TRL). `clip=(low, high)` clamps each estimate to the
      interval, with a zero derivative outside it and no NaN from an overflow behind
      the clamp: `clip=(-10, 10)` reproduces OpenRLHF's clamp of every estimator and
      verl's of k3 (verl also clamps log r to [-20, 20] before `exp`, which changes no
      value that the clamp to [-10, 10] keeps). A `"+"` variant's gradient, k2's, is
      not clipped (verl).
    - `mask` (padding mask or token weights) is applied before anything is computed:
      an entry whose mask is 0 gives exactly 0 with zero, finite derivatives, also where
      its log-probabilities are -inf or NaN or would overflow `exp`. Other weights only
      select (the reductions of `PolicyKL` weigh).
    - `importance_ratio` (TRL's `use_bias_correction_kl`: π/π_old for samples drawn by
      an older policy, `exp(log_probs - stop_gradient(old_log_probs))`) multiplies each
      estimate, with its own gradient; for a `"+"` variant it multiplies k2's gradient
      held constant, so that the gradient stays ∇KL(π ‖ π_ref) in expectation.
    - A NaN log-probability of a real token gives NaN with NaN derivatives.
    - float16 and bfloat16 inputs are computed in float32; the result is float32
      (float64 stays float64).

    Args:
        log_probs: log π(x) of the sampled tokens, any shape, e.g. (batch, tokens).
        ref_log_probs: log π_ref(x) of the same tokens, the same shape.
        estimator: one of `"k1"`, `"k2"`, `"k3"`, `"abs"`, verl's `"kl"`, `"mse"`,
            `"low_var_kl"` or Tunix's `"mse_kl"`, each with an optional `"+"` suffix.
        mask: 0 for the entries to leave out (padding, the prompt), broadcastable to
            `log_probs`; None keeps every entry.
        clip: None, or `(low, high)`: each estimate clamped to that interval.
        importance_ratio: None, or a ratio per token (broadcastable) that multiplies
            each estimate.

    Returns:
        The estimate of each token, the shape of `log_probs`; 0 where `mask` is 0.

    Example:
        >>> import numpy as np
        >>> log_probs = np.log(np.array([[0.5, 0.25, 0.125]], "float32"))
        >>> ref_log_probs = np.log(np.array([[0.25, 0.25, 0.5]], "float32"))
        >>> k3 = policy_kl(log_probs, ref_log_probs, mask=np.array([[1, 1, 0]]))
        >>> tuple(round(float(v), 4) for v in np.asarray(k3)[0])
        (0.1931, 0.0, 0.0)
    """
    name, plus = _check_estimator(estimator)
    clip = _check_clip(clip)
    log_probs = ops.convert_to_tensor(log_probs)
    dtype = core.computation_dtype(log_probs.dtype)
    log_probs = ops.cast(log_probs, dtype)
    ref_log_probs = ops.cast(ops.convert_to_tensor(ref_log_probs), dtype)
    shape = tuple(log_probs.shape)
    if tuple(ref_log_probs.shape) != shape:
        raise ValueError(
            "Invalid `ref_log_probs`: expected the shape of `log_probs`, "
            f"{shape}. Received shape {tuple(ref_log_probs.shape)}."
        )
    real = None if mask is None else _token_mask(mask, shape) > 0
    log_r = ref_log_probs - log_probs
    if real is not None:
        log_r = ops.where(real, log_r, 0.0)
    values = _clipped_estimate(name, log_r, clip)
    ratio = None
    if importance_ratio is not None:
        ratio = ops.cast(_token_mask(importance_ratio, shape, "importance_ratio"), dtype)
        if real is not None:
            ratio = ops.where(real, ratio, 1.0)
    if plus:
        k2 = 0.5 * log_r * log_r
        k2_gradient = k2 - ops.stop_gradient(k2)  # 0, with the derivatives of k2
        if ratio is not None:
            values, k2_gradient = values * ratio, ops.stop_gradient(ratio) * k2_gradient
        values = ops.stop_gradient(values) + k2_gradient
    elif ratio is not None:
        values = values * ratio
    if real is not None:
        values = ops.where(real, values, 0.0)
    return core.nan_gradients_where_nan(values)


def policy_kl_from_logits(
    logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None, axis: int = -1
) -> Tensor:
    """The exact KL(π ‖ π_ref) of each token, over the whole vocabulary, from logits.

    ```python
    pi, pi_ref = softmax(logits, axis), softmax(ref_logits, axis)
    kl = sum(pi * (log(pi) - log(pi_ref)), axis)     # no gradient reaches ref_logits
    ```

    The full KL that verl's `"full"` penalty names and does not implement. Its gradient
    is exactly ∇KL(π ‖ π_ref), with no sampling variance. A policy a few steps from its
    reference has a KL of 1e-4 to 1e-7 per token, where a float32 difference of
    log-softmaxes keeps few or no digits: this is computed from the centred difference
    of the two rows (the core's exact form, the reverse KL of `LogitsDistillation`), to
    2e-6 relative in float32 at any KL. A reference logit of -inf where π has mass gives
    the floor of that form (log π_ref taken as log(epsilon) there), not +inf.

    For sequences too long to hold the logits, `sequence_policy_kl` computes the mean
    over real tokens from hidden states and a head, chunk by chunk.

    Args:
        logits: the policy's logits, e.g. (batch, tokens, vocabulary).
        ref_logits: the reference's logits, the same shape.
        mask: 0 for the tokens to leave out, the shape of `logits` without `axis`;
            their rows are never read (0, with zero derivatives).
        axis: the vocabulary axis.

    Returns:
        KL(π ‖ π_ref) per token: the shape of `logits` without `axis`, float32 for
        half inputs.

    Example:
        >>> import numpy as np
        >>> logits = np.array([[2.0, 0.0, -1.0]], "float32")
        >>> kl = policy_kl_from_logits(logits, logits + 1e-3 * np.array([[1, -1, 0]]))
        >>> round(float(np.asarray(kl)[0]) * 1e7, 4)  # float64: 2.12722e-7
        2.1272
    """
    axis = _checks.check_axis(axis)
    logits = ops.convert_to_tensor(logits)
    dtype = core.computation_dtype(logits.dtype)
    logits = ops.cast(logits, dtype)
    ref_logits = ops.cast(ops.convert_to_tensor(ref_logits), dtype)
    if tuple(ref_logits.shape) != tuple(logits.shape):
        raise ValueError(
            "Invalid `ref_logits`: expected the shape of `logits`, "
            f"{tuple(logits.shape)}. Received shape {tuple(ref_logits.shape)}."
        )
    if mask is not None:
        rank = len(logits.shape)
        _checks.check_axis_in_rank(axis, rank)
        rows = tuple(size for i, size in enumerate(logits.shape) if i != axis % rank)
        real = ops.expand_dims(_token_mask(mask, rows) > 0, axis)
        logits = ops.where(real, logits, 0.0)
        ref_logits = ops.where(real, ref_logits, 0.0)
    values = core.divergence_values(
        "reverse_kl", "logits", ops.stop_gradient(ref_logits), logits, axis
    )
    if mask is not None:
        values = ops.where(ops.squeeze(real, axis), values, 0.0)
    return values


def sequence_policy_kl(
    policy_hidden: Tensor,
    policy_head: Any,
    reference: Any,
    mask: Tensor | None = None,
    chunk_size: int = 1024,
    backward: str = "stored",
) -> Tensor:
    """The mean of `policy_kl_from_logits` over real tokens, from hidden states and a head.

    `sequence_distillation_loss` with the policy as the student and the reference as
    the teacher, `divergence="reverse_kl"`: the tokens are taken `chunk_size` at a time
    and no tensor of every token and the whole vocabulary is formed. The heads,
    `reference` (logits, or a `(ref_hidden, ref_head)` pair), the mask, `backward` and the
    autodiff modes are those of `kl_keras.distillation.sequence_distillation_loss`.

    Returns:
        sum(mask * KL(π ‖ π_ref)) / sum(mask), a scalar.
    """
    return sequence_distillation_loss(
        policy_hidden,
        policy_head,
        reference,
        mask,
        "reverse_kl",
        chunk_size=chunk_size,
        backward=backward,
    )


def _reduce(values: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """The reductions of `PolicyKL`, over the global batch (all-reduced under
    `tf.distribute`)."""
    if reduction == "none":
        return values
    weights = ops.ones_like(values) if mask is None else ops.cast(mask, values.dtype)
    weights = weights + ops.zeros_like(values)  # broadcast to the values' shape
    weighted = ops.where(weights > 0, values, 0.0) * weights
    if reduction == "token_mean":
        total, count = _distribute.global_sums(ops.sum(weighted), ops.sum(weights))
    else:
        token_axes = tuple(range(1, len(values.shape)))
        per_sequence = ops.sum(weighted, axis=token_axes)
        if reduction == "sequence_mean":
            tokens = ops.sum(weights, axis=token_axes)
            per_sequence = per_sequence / ops.where(tokens > 0, tokens, 1.0)
        sequences = ops.cast(ops.shape(values)[0], values.dtype)
        total, count = _distribute.global_sums(ops.sum(per_sequence), sequences)
    return ops.where(count > 0, total / ops.where(count > 0, count, 1.0), 0.0)


@keras.saving.register_keras_serializable(package="kl_keras")
class PolicyKL(keras.losses.Loss):
    """The KL penalty of a policy against its reference, a Keras loss.

    `y_true` holds the reference's log-probabilities of the sampled tokens, `y_pred`
    the policy's (any shape, e.g. (batch, tokens)), `sample_weight` the mask: 0 for
    padding and prompt tokens, or token weights. Each token's estimate is
    `kl_keras.policy_kl(y_pred, y_true, estimator, sample_weight, clip)` (see there
    for what each estimator's gradient is); the reduction is one of the trainers':

    ```python
    "token_mean":    sum(w * k) / sum(w)                       # verl "token-mean", DAPO
    "sequence_sum":  mean over sequences of sum_t(w * k)        # verl "seq-mean-token-sum"
    "sequence_mean": mean over sequences of sum_t(w * k) / sum_t(w)  # GRPO's
    "none":          k per token
    ```

    Every sum and count is over the global batch (all-reduced inside a
    `tf.distribute` replica, whose share of the global mean is returned, as Keras's
    losses do), so replicas with more padding than others do not tilt the mean; a
    sequence with no real token counts as 0 in the sequence means, and a batch with
    no real token gives 0. Keras's `"sum_over_batch_size"` would divide by every
    position, padding included.

    Args:
        estimator: as in `kl_keras.policy_kl`; default `"k3+"`.
        clip: as in `kl_keras.policy_kl`; default None (no clamp).
        reduction: one of `"token_mean"`, `"sequence_sum"`, `"sequence_mean"`,
            `"none"`.
        name: name of the loss instance.
        dtype: as in Keras losses; the result is cast to it (the estimates are
            computed in float32 from half inputs).

    Example:
        >>> import numpy as np
        >>> ref = np.log(np.array([[0.2, 0.3, 0.4]], "float32"))
        >>> policy = np.log(np.array([[0.25, 0.25, 0.4]], "float32"))
        >>> loss = PolicyKL(estimator="k1")(ref, policy, sample_weight=[[1, 1, 0]])
        >>> round(float(loss), 5)  # (log(0.25 / 0.2) + log(0.25 / 0.3)) / 2
        0.02041
    """

    def __init__(
        self,
        estimator: str = "k3+",
        clip: tuple[float, float] | None = None,
        reduction: str = "token_mean",
        name: str | None = "policy_kl",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(name=name, reduction="none", dtype=dtype)
        _check_estimator(estimator)
        self.estimator = estimator
        self.clip = _check_clip(clip)
        self.reduction = _checks.check_choice("reduction", reduction, REDUCTIONS)
        self._dtype_argument = None if dtype is None else self._dtype_policy.name

    def __call__(self, y_true: Tensor, y_pred: Tensor, sample_weight: Tensor | None = None) -> Any:
        with keras.name_scope(self.name):
            values = policy_kl(y_pred, y_true, self.estimator, sample_weight, self.clip)
            loss = _reduce(values, sample_weight, self.reduction)
            if self.reduction != "none":
                loss = _distribute.per_replica(loss)
            return ops.cast(loss, self.dtype)

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        return policy_kl(y_pred, y_true, self.estimator, None, self.clip)

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            {
                "estimator": self.estimator,
                "clip": None if self.clip is None else list(self.clip),
                "dtype": self._dtype_argument,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: Config) -> "PolicyKL":
        _checks.check_config(cls, config)
        return cls(**config)
