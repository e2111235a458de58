"""Float64 references of every formula of kl_keras, keyed by the core's names.

The names are those of `kl_keras.divergence.DIVERGENCES` ("kl", "reverse_kl", "jeffreys",
"jensen_shannon", "binary_kl") and its three kinds of input: `on_probabilities`,
`on_target` (a probability target against logits) and `on_logits` (teacher against
student logits at a temperature). Each is the plain textbook formula in numpy/scipy with
the library's documented floors, sharing nothing with the library's centred forms; the
tests convert their float32 inputs to the dtype here (float64, or `np.longdouble` where
the close-distributions contract needs more digits than float64's log-probabilities).
"""

import numpy as np

EPSILON = 1e-7  # keras.config.epsilon()
LOG_EPSILON = np.log(EPSILON)
NAMES = ("kl", "reverse_kl", "jeffreys", "jensen_shannon", "binary_kl")


def log_softmax(z, axis=-1):
    """log softmax(z) in the dtype of `z` (long double stays long double)."""
    z = z - np.max(z, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


def softmax(z, axis=-1):
    return np.exp(log_softmax(z, axis))


def floored(x):
    return np.maximum(x, EPSILON)


def relative_entropy(p, q):
    """`p * log(p / q)` elementwise, 0 where p = 0, in the dtype of the inputs (scipy's
    `rel_entr` computes long double in float64)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p == 0, 0.0, p * np.log(np.where(p == 0, 1.0, p) / q))


def jensen_shannon_terms(p, q, beta):
    m = beta * p + (1 - beta) * q
    return (1 - beta) * relative_entropy(p, m) + beta * relative_entropy(q, m)


def probability_terms(name, p, q, beta=0.5):
    """The terms of D(p ‖ q) on probabilities, elementwise, in the dtype of `p` and `q`; the
    one inside a log floored at epsilon (Jeffreys: both)."""
    if name == "jensen_shannon" and beta in (0.0, 1.0):
        name = "kl" if beta == 0.0 else "reverse_kl"
    if name == "kl":
        return relative_entropy(p, floored(q))
    if name == "reverse_kl":
        return relative_entropy(q, floored(p))
    if name == "jeffreys":
        return (p - q) * (np.log(floored(p)) - np.log(floored(q)))
    if name == "jensen_shannon":
        return jensen_shannon_terms(p, q, beta)
    return relative_entropy(p, floored(q)) + relative_entropy(1 - p, floored(1 - q))


def on_probabilities(name, p, q, beta=0.5, axis=-1):
    """D(p ‖ q) on probabilities in float64 (see `probability_terms`)."""
    return np.sum(probability_terms(name, np.float64(p), np.float64(q), beta), axis=axis)


def on_target(name, p, logits, beta=0.5, axis=-1, dtype=np.float64):
    """D(p ‖ softmax(logits)) (binary KL: `sigmoid(logits)`, per entry) in `dtype`, nothing
    clipped but the target's floor inside a log of reverse KL and Jeffreys."""
    p, z = dtype(p), dtype(logits)
    if name == "binary_kl":
        q = 1 / (1 + np.exp(-z))
        return np.sum(relative_entropy(p, q) + relative_entropy(1 - p, 1 - q), axis=axis)
    q = softmax(z, axis)
    if name == "jensen_shannon" and beta in (0.0, 1.0):
        name = "kl" if beta == 0.0 else "reverse_kl"
    if name == "kl":
        terms = relative_entropy(p, q)
    elif name == "reverse_kl":
        terms = relative_entropy(q, floored(p))
    elif name == "jeffreys":
        terms = (p - q) * (np.log(floored(p)) - log_softmax(z, axis))
    else:
        terms = jensen_shannon_terms(p, q, beta)
    return np.sum(terms, axis=axis)


def on_logits(name, teacher, student, temperature=1.0, beta=0.5, axis=-1, dtype=np.float64):
    """T²·D(P ‖ Q), P and Q the softmaxes at temperature T, per row; log P of a masked
    (-inf) teacher entry floored at log(epsilon) for reverse KL and Jeffreys."""
    log_p = log_softmax(dtype(teacher) / temperature, axis)
    log_q = log_softmax(dtype(student) / temperature, axis)
    p, q = np.exp(log_p), np.exp(log_q)
    floor = np.maximum(log_p, LOG_EPSILON)
    if name == "jensen_shannon" and beta in (0.0, 1.0):
        name = "kl" if beta == 0.0 else "reverse_kl"
    with np.errstate(invalid="ignore", divide="ignore"):
        if name == "kl":
            terms = np.where(p > 0, p * (log_p - log_q), 0.0)
        elif name == "reverse_kl":
            terms = np.where(q > 0, q * (log_q - floor), 0.0)
        elif name == "jeffreys":
            terms = np.where((p > 0) | (q > 0), (p - q) * (floor - log_q), 0.0)
        else:
            log_m = np.logaddexp(np.log(beta) + log_p, np.log(1 - beta) + log_q)
            terms = (1 - beta) * np.where(p > 0, p * (log_p - log_m), 0.0)
            terms += beta * np.where(q > 0, q * (log_q - log_m), 0.0)
    return temperature**2 * terms.sum(axis)


def on_logits_with_gradients(name, teacher, student, temperature, beta=0.5, dtype=np.longdouble):
    """`on_logits` (rows along the last axis, nothing masked) and its gradients with respect
    to both logits, by the chain rule through both softmaxes, in `dtype`."""
    a, b = dtype(teacher) / temperature, dtype(student) / temperature
    lp, lq = log_softmax(a), log_softmax(b)
    p, q = np.exp(lp), np.exp(lq)
    if name == "jensen_shannon":
        m = beta * p + (1 - beta) * q
        lm = np.log(m)
        value = (1 - beta) * np.sum(p * (lp - lm), -1) + beta * np.sum(q * (lq - lm), -1)
        cross = ((1 - beta) * p + beta * q) / m
        dp = (1 - beta) * (lp + 1 - lm) - beta * cross
        dq = beta * (lq + 1 - lm) - (1 - beta) * cross
    elif name == "kl":
        value = np.sum(p * (lp - lq), -1)
        dp, dq = lp + 1 - lq, -p / q
    elif name == "reverse_kl":
        value = np.sum(q * (lq - lp), -1)
        dp, dq = -q / p, lq + 1 - lp
    else:
        value = np.sum((p - q) * (lp - lq), -1)
        dp = (lp - lq) + (p - q) / p
        dq = -(lp - lq) - (p - q) / q
    # Through the softmaxes: d/da_j = p_j (dp_j - sum(p dp)); T² / T for the logits' scale.
    grad_t = p * (dp - np.sum(p * dp, -1, keepdims=True)) * temperature
    grad_s = q * (dq - np.sum(q * dq, -1, keepdims=True)) * temperature
    return temperature**2 * value, grad_t, grad_s


def bernoulli_kl(rho, rho_hat):
    """KL(Bernoulli(rho) ‖ Bernoulli(rho_hat)), both terms, rho_hat clipped to [ε, 1 - ε]."""
    rho_hat = np.clip(np.float64(rho_hat), EPSILON, 1 - EPSILON)
    return relative_entropy(rho, rho_hat) + relative_entropy(1 - rho, 1 - rho_hat)


def sparsity_penalty(x, rho, beta=1.0):
    """β·Σ_j KL(ρ ‖ ρ̂_j), ρ̂_j the mean over every axis but the last (a rank-1 x: one unit)."""
    x = np.float64(x)
    rho_hat = x.reshape(-1, x.shape[-1]).mean(axis=0) if x.ndim > 1 else x.mean()
    return beta * np.sum(bernoulli_kl(rho, rho_hat))


def gaussian_kl(mean, log_var, prior_mean=0.0, prior_log_var=0.0, axis=-1):
    """KL(N(mean, e^log_var) ‖ N(prior_mean, e^prior_log_var)) summed over `axis`."""
    mean, log_var = np.float64(mean), np.float64(log_var)
    d = log_var - prior_log_var
    terms = 0.5 * (np.expm1(d) - d + (mean - prior_mean) ** 2 * np.exp(-np.float64(prior_log_var)))
    return np.sum(terms, axis=axis)


def top_k(name, ids, log_probs, student_logits, tail, temperature=1.0, beta=0.5):
    """T²·D(P' ‖ Q') per token of a teacher's top-k (ids, log-probabilities at T) against
    student logits (kl_keras.TopKDistillation), in long double: `tail="bucket"` adds the
    (k+1)-th bucket 1 - sum to both sides (none when k = V), `"renormalize"` divides each
    by its sum over the ids."""
    p = np.exp(np.longdouble(log_probs))
    q_all = softmax(np.longdouble(student_logits) / temperature)
    q = np.take_along_axis(q_all, np.asarray(ids), axis=-1)
    if tail == "bucket" and np.shape(ids)[-1] < np.shape(student_logits)[-1]:
        rest = np.ones(q_all.shape, bool)
        np.put_along_axis(rest, np.asarray(ids), False, axis=-1)
        p = np.concatenate([p, np.maximum(1 - p.sum(-1, keepdims=True), 0)], -1)
        q = np.concatenate([q, np.sum(q_all * rest, -1, keepdims=True)], -1)
    else:
        p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    values = np.sum(probability_terms(name, p, q, beta), axis=-1)
    return temperature**2 * values.astype(np.float64)
