"""Properties of KL that must hold for every valid input, checked with hypothesis.

Example counts are bounded (EXAMPLES per property) and the search is derandomized,
so every CI run tries the same inputs on every backend.
"""

import numpy as np
import pytest
import reference as ref
from helpers import to_numpy, value_and_grad
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import log_softmax

from kl_keras import kl_divergence

pytestmark = pytest.mark.numerics  # the math alone: no Keras version changes it

EXAMPLES = 40
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
PROPERTY_COUNT = 7  # the tests below; quoted with EXAMPLES in the README


@st.composite
def distributions(draw, rows=None, classes=None, zeros=True, smallest=1e-3):
    """A float32 (rows, classes) array of probability rows, some entries exactly 0."""
    rows = rows or draw(st.integers(1, 4))
    classes = classes or draw(st.integers(2, 9))
    entry = st.floats(smallest, 10.0)
    if zeros:
        entry = st.one_of(st.just(0.0), entry)
    values = np.array(draw(st.lists(entry, min_size=rows * classes, max_size=rows * classes)))
    values = values.reshape(rows, classes)
    values[:, 0] += 1e-3  # no all-zero row
    return (values / values.sum(-1, keepdims=True)).astype("float32")


@st.composite
def logits_like(draw, shape):
    values = draw(
        st.lists(st.floats(-20.0, 20.0), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    )
    return np.array(values, dtype="float32").reshape(shape)


@st.composite
def pair(draw, from_logits):
    p = draw(distributions())
    y = draw(logits_like(p.shape)) if from_logits else draw(distributions(*p.shape, zeros=False))
    return p, y


def reference(p, y, from_logits):
    return ref.on_target("kl", p, y) if from_logits else ref.on_probabilities("kl", p, y)


@PROPERTY
@given(st.booleans().flatmap(lambda f: st.tuples(st.just(f), pair(f))))
def test_kl_is_non_negative_and_matches_scipy(case):
    from_logits, (p, y) = case
    loss = to_numpy(kl_divergence(p, y, from_logits=from_logits))
    assert np.all(loss >= -1e-6), loss  # Gibbs' inequality, to float32 rounding
    np.testing.assert_allclose(loss, reference(p, y, from_logits), rtol=1e-4, atol=2e-6)


@PROPERTY
@given(distributions())
def test_kl_of_a_distribution_with_itself_is_zero(p):
    assert np.all(to_numpy(kl_divergence(p, p)) == 0.0)  # every ratio is exactly 1
    logits = np.log(np.maximum(p, 1e-30))
    loss = to_numpy(kl_divergence(p, logits, from_logits=True))
    np.testing.assert_allclose(loss, 0.0, atol=2e-6)


@PROPERTY
@given(st.booleans().flatmap(lambda f: st.tuples(st.just(f), pair(f), st.randoms())))
def test_kl_is_invariant_to_permuting_classes(case):
    from_logits, (p, y), random = case
    order = list(range(p.shape[-1]))
    random.shuffle(order)
    original = to_numpy(kl_divergence(p, y, from_logits=from_logits))
    permuted = to_numpy(kl_divergence(p[:, order], y[:, order], from_logits=from_logits))
    np.testing.assert_allclose(permuted, original, rtol=1e-5, atol=1e-6)


@PROPERTY
@given(distributions(rows=1), distributions(rows=1), st.data())
def test_kl_is_additive_over_independent_products(p1, p2, data):
    # Every product q1_i * q2_j stays above the epsilon floor (entries >= 0.05 / 90.05).
    q1 = data.draw(distributions(1, p1.shape[-1], zeros=False, smallest=0.05))
    q2 = data.draw(distributions(1, p2.shape[-1], zeros=False, smallest=0.05))
    joint_p = np.outer(p1, p2).reshape(1, -1)
    joint_q = np.outer(q1, q2).reshape(1, -1)
    joint = to_numpy(kl_divergence(joint_p, joint_q))
    separate = to_numpy(kl_divergence(p1, q1)) + to_numpy(kl_divergence(p2, q2))
    np.testing.assert_allclose(joint, separate, rtol=1e-4, atol=2e-6)


@PROPERTY
@given(pair(from_logits=True), st.floats(-50.0, 50.0))
def test_logits_are_invariant_to_adding_a_constant(case, shift):
    p, z = case
    original = to_numpy(kl_divergence(p, z, from_logits=True))
    shifted = to_numpy(kl_divergence(p, (z + np.float32(shift)), from_logits=True))
    np.testing.assert_allclose(shifted, original, rtol=1e-4, atol=2e-5)


@PROPERTY
@given(st.booleans().flatmap(lambda f: st.tuples(st.just(f), pair(f))))
def test_gradient_matches_float64_central_differences(case):
    from_logits, (p, y) = case
    if not from_logits:
        y = (0.9 * y + 0.1 / y.shape[-1]).astype("float32")  # keep away from the floor
    _, (_, grad) = value_and_grad(lambda t, q: kl_divergence(t, q, from_logits=from_logits), p, y)
    step = 1e-6
    expected = np.zeros(y.shape)
    for index in np.ndindex(y.shape):
        plus, minus = np.float64(y), np.float64(y)
        plus[index] += step
        minus[index] -= step
        expected[index] = (
            reference(p, plus, from_logits).sum() - reference(p, minus, from_logits).sum()
        ) / (2 * step)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-4)


@PROPERTY
@given(pair(from_logits=True))
def test_logit_gradient_is_softmax_minus_target(case):
    p, z = case
    _, (_, grad) = value_and_grad(lambda t, y: kl_divergence(t, y, from_logits=True), p, z)
    expected = np.exp(log_softmax(np.float64(z), axis=-1)) * p.sum(-1, keepdims=True) - p
    np.testing.assert_allclose(grad, expected, atol=1e-6)
