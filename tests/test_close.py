"""Close distributions: every divergence from logits against an extended-precision reference.

The grid of the close-distributions contract: teacher logits `t = 3·N(0, 1) + c`, student
`s = t + σ·N(0, 1)`, both float32, for σ from 1e-4 (KL ≈ 1e-9) to 3 (KL ≈ 3), offsets c
from 0 to 1e3, temperatures 1 and 4 and vocabularies up to 262144. The reference is
computed from the same float32 inputs in `np.longdouble` (80-bit on x86: float64's own
rounding of log-probabilities, about 1e-15, is 1e-6 of a KL of 1e-9), with the plain
formulas, so it shares nothing with the library's centred form.

Logits against logits (`LogitsDistillation`, every divergence) are exact: relative error
<= 2e-6 (V <= 32000) and 1e-5 (V = 262144). Gradients are within 1e-5 of the largest entry.
A probability target (`kl_divergence(p, logits, from_logits=True)`) is exact for the
normalized target up to the rounding of log p of a float32 p (see the numerics guide).
"""

import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, to_numpy, value_and_grad
from hypothesis import given, settings
from hypothesis import strategies as st

import kl_keras

# The math alone, the same on every Keras version: the minimum-Keras CI run skips it.
pytestmark = pytest.mark.numerics

LD = np.longdouble
DIVERGENCES = ["kl", "reverse_kl", "jeffreys", "jensen_shannon"]
BETA = 0.3  # a mixture weight that is not symmetric, so the two roles are checked


def log_softmax(z):
    return ref.log_softmax(z)


def reference(teacher, student, divergence, temperature, beta=BETA):
    """T²·D(P ‖ Q) and its gradients with respect to both logits, in long double."""
    return ref.on_logits_with_gradients(divergence, teacher, student, temperature, beta, LD)


def logits(sigma, offset, vocabulary, rows=4, seed=0):
    rng = np.random.default_rng(seed)
    teacher = (3.0 * rng.normal(size=(rows, vocabulary)) + offset).astype("float32")
    student = (teacher + sigma * rng.normal(size=(rows, vocabulary))).astype("float32")
    return teacher, student


def distillation(divergence, temperature):
    loss = kl_keras.LogitsDistillation(temperature, divergence, beta=BETA, reduction="none")
    return lambda t, s: loss(t, s)


def relative_error(value, expected):
    return np.max(np.abs(np.asarray(value, LD) - expected) / expected)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("offset", [0.0, 30.0, 1000.0])
@pytest.mark.parametrize("sigma", [1e-4, 2e-3, 0.05, 3.0])
def test_distillation_is_exact_for_close_distributions(sigma, offset, divergence, temperature):
    teacher, student = logits(sigma, offset, 32000)
    fn = distillation(divergence, temperature)
    expected, grad_t, grad_s = reference(teacher, student, divergence, temperature)
    assert relative_error(to_numpy(fn(teacher, student)), expected) <= 2e-6
    _, (got_t, got_s) = value_and_grad(fn, teacher, student)
    for got, want in [(got_t, grad_t), (got_s, grad_s)]:
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distillation_is_exact_at_a_262k_vocabulary(divergence):
    teacher, student = logits(2e-3, 30.0, 262144, rows=2)
    expected, _, _ = reference(teacher, student, divergence, 1.0)
    value = to_numpy(distillation(divergence, 1.0)(teacher, student))
    assert relative_error(value, expected) <= 1e-5


def test_the_0_2_form_was_not_exact():
    # What the close-distribution core replaces, kept as a check that the grid can fail:
    # log-softmax differences lose most digits at KL ≈ 2e-6 (0.4-1.5 relative on 0.2).
    teacher, student = logits(2e-3, 30.0, 32000)
    expected, _, _ = reference(teacher, student, "kl", 1.0)
    lp = (
        teacher
        - np.log(np.sum(np.exp(teacher - teacher.max(-1, keepdims=True)), -1, keepdims=True))
        - teacher.max(-1, keepdims=True)
    )
    lq = (
        student
        - np.log(np.sum(np.exp(student - student.max(-1, keepdims=True)), -1, keepdims=True))
        - student.max(-1, keepdims=True)
    )
    naive = np.sum(np.exp(lp) * (lp - lq), -1, dtype="float32")
    assert relative_error(naive, expected) > 1e-2


EPSILON = ref.EPSILON  # probabilities given as inputs are floored there


def floored(x):
    return np.maximum(x, EPSILON)


# Each divergence's function, on probabilities or (from_logits=True) against logits; the
# references (reference.py) carry kl_keras's floors at 1e-7 (Keras's convention).
PROBABILITIES = {
    "kl": kl_keras.kl_divergence,
    "reverse_kl": kl_keras.reverse_kl_divergence,
    "jeffreys": kl_keras.jeffreys_divergence,
    "jensen_shannon": lambda p, q, **kwargs: kl_keras.jensen_shannon_divergence(
        p, q, beta=BETA, **kwargs
    ),
}


@pytest.mark.parametrize("offset", [0.0, 1000.0])
@pytest.mark.parametrize("sigma", [2e-3, 0.05, 3.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_probability_targets_are_exact_up_to_the_log_of_a_rounded_target(name, sigma, offset):
    # p = softmax(t) rounded to float32, against logits. The log of a float32 p carries up
    # to eps·|log p| per entry, which moves the value by about eps·|log p|·|q - p|; and
    # the plain formula's term in sum(p) - 1 (a few 1e-9 here) is resolved by a float32
    # sum near 1 only to its ulp, eps = 1.2e-7. Everything else is exact.
    teacher, student = logits(sigma, offset, 32000)
    p = np.exp(log_softmax(LD(teacher))).astype("float32")
    target, q = LD(p), np.exp(log_softmax(LD(student)))
    function = PROBABILITIES[name]
    expected = ref.on_target(name, p, student, BETA, dtype=LD)
    value = np.asarray(to_numpy(function(p, student, from_logits=True)), LD)
    eps = np.finfo("float32").eps
    bound = 4 * eps * np.sum(np.abs(q - target) * (1 + np.abs(np.log(target))), -1)
    bound = bound + 2e-6 * np.abs(expected) + eps * (1 + np.abs(expected))
    assert np.all(np.abs(value - expected) <= bound)


@pytest.mark.parametrize("sigma", [1e-3, 0.05, 1.0])
def test_binary_kl_from_logits_for_close_distributions(sigma):
    rng = np.random.default_rng(1)
    z_true = rng.normal(scale=2.0, size=(64, 8))
    p = (1 / (1 + np.exp(-z_true))).astype("float32")
    z = np.log(p.astype(LD)) - np.log1p(-p.astype(LD)) + sigma * rng.normal(size=p.shape)
    z = z.astype("float32")
    p64, z64 = LD(p), LD(z)
    q = 1 / (1 + np.exp(-z64))
    expected = ref.on_target("binary_kl", p, z, dtype=LD)
    value = np.asarray(to_numpy(kl_keras.binary_kl_divergence(p, z, from_logits=True)), LD)
    # The log-odds of a float32 p carry eps·(|log p| + |log(1 - p)|): the input's limit.
    eps = np.finfo("float32").eps
    logit_error = eps * (np.abs(np.log(p64)) + np.abs(np.log1p(-p64)) + np.abs(z64))
    bound = np.sum(2 * logit_error * np.abs(q - p64), -1) + 2e-6 * expected
    assert np.all(np.abs(value - expected) <= bound)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_inputs_give_exactly_zero_with_zero_gradients(divergence):
    teacher, _ = logits(0.0, 30.0, 1000)
    fn = distillation(divergence, 2.0)
    value, (grad_t, grad_s) = value_and_grad(fn, teacher, teacher)
    assert value == 0.0
    assert np.all(grad_t == 0.0) and np.all(grad_s == 0.0)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    shift_teacher=st.floats(-1e3, 1e3),
    shift_student=st.floats(-1e3, 1e3),
    sigma=st.sampled_from([1e-3, 0.1, 2.0]),
    divergence=st.sampled_from(DIVERGENCES),
    temperature=st.sampled_from([1.0, 3.0]),
)
def test_property_a_constant_added_to_a_row_changes_nothing(
    shift_teacher, shift_student, sigma, divergence, temperature
):
    teacher, student = logits(sigma, 0.0, 512, rows=2, seed=3)
    shifted_t = (teacher + np.float32(shift_teacher)).astype("float32")
    shifted_s = (student + np.float32(shift_student)).astype("float32")
    # Against the reference on the shifted float32 inputs (shifting rounds them).
    expected, _, _ = reference(shifted_t, shifted_s, divergence, temperature)
    value = to_numpy(distillation(divergence, temperature)(shifted_t, shifted_s))
    assert np.all(value >= 0)
    assert relative_error(value, expected) <= 2e-6


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    scale=st.floats(1e-3, 10.0),
    sigma=st.floats(1e-4, 3.0),
    divergence=st.sampled_from(DIVERGENCES),
)
def test_property_never_negative_and_zero_only_for_equal_rows(scale, sigma, divergence):
    rng = np.random.default_rng(7)
    teacher = (scale * rng.normal(size=(3, 257))).astype("float32")
    student = (teacher + sigma * rng.normal(size=teacher.shape)).astype("float32")
    value = to_numpy(distillation(divergence, 1.0)(teacher, student))
    assert np.all(value > 0)
    assert np.all(to_numpy(distillation(divergence, 1.0)(teacher, teacher)) == 0.0)


@pytest.mark.parametrize("sigma", [1e-3, 0.5])
def test_jensen_shannon_is_continuous_at_both_ends(sigma):
    teacher, student = logits(sigma, 0.0, 1000)

    def js(beta):
        loss = kl_keras.LogitsDistillation(2.0, "jensen_shannon", beta=beta, reduction="none")
        return np.asarray(to_numpy(loss(teacher, student)), "float64")

    forward = to_numpy(distillation("kl", 2.0)(teacher, student))
    reverse = to_numpy(distillation("reverse_kl", 2.0)(teacher, student))
    np.testing.assert_array_equal(js(0.0), forward)
    np.testing.assert_array_equal(js(1.0), reverse)
    np.testing.assert_allclose(js(1e-6), forward, rtol=1e-5)
    np.testing.assert_allclose(js(1 - 1e-6), reverse, rtol=1e-5)


def test_extreme_logits_are_exact():
    # ±1e4 logits: log-softmax as (z - max) - log(sum(exp(z - max))) keeps the digits that
    # z - logsumexp(z) rounds away (10004.389 for 10004.5945 on 0.2, TensorFlow and JAX).
    teacher = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], "float32")
    student = np.array([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]], "float32")
    for divergence in DIVERGENCES:
        with np.errstate(divide="ignore", invalid="ignore"):  # gradients of e^-2e4 entries
            expected, _, _ = reference(teacher, student, divergence, 1.0)
        value = to_numpy(distillation(divergence, 1.0)(teacher, student))
        assert relative_error(value, expected) <= 2e-6, divergence


@pytest.mark.skipif(BACKEND == "jax", reason="JAX computes float64 in float32 unless x64")
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_float64_is_float64_throughout(divergence):
    teacher, student = logits(0.05, 10.0, 1000)
    teacher, student = teacher.astype("float64"), student.astype("float64")
    loss = kl_keras.LogitsDistillation(
        2.0, divergence, beta=BETA, reduction="none", dtype="float64"
    )
    expected, _, _ = reference(teacher, student, divergence, 2.0)
    assert relative_error(to_numpy(loss(teacher, student)), expected) <= 1e-12
    js = kl_keras.JensenShannonDivergence(
        beta=BETA, from_logits=True, dtype="float64", reduction="none"
    )
    p = np.exp(np.asarray(log_softmax(LD(teacher)), "float64"))
    want, _, _ = reference(np.log(p), student, "jensen_shannon", 1.0)
    assert relative_error(to_numpy(js(p, student)), want) <= 1e-12


def probability_error_scale(name, p, q):
    """What one float32 rounding per log ratio weighs, per entry, in each formula."""
    if name == "kl":
        return p  # p·log(rounded p / q): one ulp of the ratio, times p
    if name == "reverse_kl":
        return q
    if name == "jeffreys":  # the difference of two logs, each rounded
        return np.abs(p - q) * (1 + np.abs(np.log(floored(p))) + np.abs(np.log(floored(q))))
    return p + q


@pytest.mark.parametrize("offset", [0.0, 30.0])
@pytest.mark.parametrize("sigma", [1e-4, 2e-3, 0.05, 3.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_probabilities_are_exact_up_to_one_rounding_per_log_ratio(name, sigma, offset):
    # Two float32 softmax outputs. On probabilities each log of a ratio is taken once, of
    # the rounded ratio (the fast form of 0.2, kept: log1p of the exact difference was
    # 3-8x slower under XLA), so each term carries one float32 rounding of its log, and
    # close rows resolve KL only to about eps·sum(p) (the numerics guide: pass logits).
    # The bound is that, plus the rounding of the sum itself.
    teacher, student = logits(sigma, offset, 32000)
    p = np.exp(log_softmax(LD(teacher))).astype("float32")
    q = np.exp(log_softmax(LD(student))).astype("float32")
    function = PROBABILITIES[name]
    terms = ref.probability_terms(name, LD(p), LD(q), BETA)
    expected = np.sum(terms, -1)
    value = np.asarray(to_numpy(function(p, q)), LD)
    eps = np.finfo("float32").eps
    scale = probability_error_scale(name, LD(p), LD(q))
    bound = 2e-6 * np.abs(expected) + 2 * eps * np.sum(scale + np.abs(terms), -1)
    assert np.all(np.abs(value - expected) <= bound)
