"""`kl_keras._kernels` on every backend: both exact forms, and the closed-form derivatives.

The log-sigmoids of binary KL have two forms (PyTorch's fused kernels, XLA's shared
`log1p(exp(-|z|))`); each is forced here on the current backend, so both are checked
against float64 on all three, and the two must give the same gradients. KL from logits
and on probabilities has one form, differentiated by its closed form (`with_derivatives`):
those derivatives must be the ones the backend's own autodiff traces through the core they
replace.
"""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import value_and_grad
from scipy.special import softmax

import kl_keras
from kl_keras import _kernels

pytestmark = pytest.mark.numerics  # the math of each backend's kernels: no Keras version changes it

RNG = np.random.default_rng(13)
P = RNG.dirichlet(np.full(7, 0.5), size=5).astype("float32")
P[0, 2] = 0.0  # a zero target
Z = RNG.normal(scale=3.0, size=(5, 7)).astype("float32")
BITS = RNG.uniform(size=(5, 7)).astype("float32")
BITS[0, :2] = [0.0, 1.0]


def kl(p, q):
    return ref.on_probabilities("kl", p, q)


# name -> (kl_keras function, float64 reference on (p, logits), targets)
CASES = {
    name: (
        getattr(kl_keras, f"{name}_divergence"),
        lambda p, z, name=name: ref.on_target(name, p, z),
        BITS if name == "binary_kl" else P,
    )
    for name in ref.NAMES
}


@pytest.fixture(params=[True, False], ids=["op_by_op", "fusable"])
def form(request, monkeypatch):
    monkeypatch.setattr(_kernels, "op_by_op", lambda: request.param)
    return request.param


def grad_of_logits(name, targets):
    function = CASES[name][0]
    return value_and_grad(lambda p, z: function(p, z, from_logits=True), targets, Z)


@pytest.mark.parametrize("name", list(CASES))
def test_both_forms_match_float64(form, name):
    _, reference, targets = CASES[name]
    value, _ = grad_of_logits(name, targets)
    np.testing.assert_allclose(value, np.sum(reference(targets, Z)), rtol=2e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_both_forms_have_the_same_gradients(monkeypatch, name):
    targets = CASES[name][2]
    monkeypatch.setattr(_kernels, "op_by_op", lambda: True)
    _, (grad_p_op, grad_z_op) = grad_of_logits(name, targets)
    monkeypatch.setattr(_kernels, "op_by_op", lambda: False)
    _, (grad_p, grad_z) = grad_of_logits(name, targets)
    np.testing.assert_allclose(grad_z_op, grad_z, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_p_op, grad_p, rtol=1e-5, atol=1e-6)


def test_kl_gradient_is_softmax_minus_target(form):
    _, (grad_p, grad_z) = grad_of_logits("kl", P)
    q = softmax(np.float64(Z), axis=-1)
    np.testing.assert_allclose(grad_z, q * P.sum(-1, keepdims=True) - P, atol=1e-6)
    assert grad_p[0, 2] == 0.0  # the zero target: gradient 0, not -inf or NaN


def test_masked_classes_and_invalid_rows(form):
    p = np.array([[0.6, 0.0, 0.4], [0.5, -0.1, 0.6], [0.3, 0.3, 0.4]], dtype="float32")
    z = np.array([[1.0, -np.inf, 2.0], [0.1, 0.2, 0.3], [0.0, 1.0, np.nan]], dtype="float32")
    value = keras.ops.convert_to_numpy(kl_keras.kl_divergence(p, z, from_logits=True))
    expected = kl(np.float64([0.6, 0.4]), softmax(np.float64([1.0, 2.0])))
    np.testing.assert_allclose(value[0], expected, rtol=2e-6)
    assert np.isnan(value[1]) and np.isnan(value[2])
    _, (_, grad_z) = value_and_grad(
        lambda t, u: kl_keras.kl_divergence(t, u, from_logits=True), p, z
    )
    assert grad_z[0, 1] == 0.0 and np.all(np.isfinite(grad_z[0]))
    assert np.all(np.isnan(grad_z[1:]))


def rule_inputs(kind):
    rng = np.random.default_rng(5)
    teacher = rng.normal(scale=2.0, size=(4, 9)).astype("float32")
    noise = rng.normal(size=(4, 9)).astype("float32")
    if kind == "far":
        return teacher, noise
    if kind == "close":
        return teacher, teacher + np.float32(1e-3) * noise
    if kind == "offset":  # a constant between the rows, and close
        return teacher, teacher + np.float32(30.0) + np.float32(1e-3) * noise
    teacher[0, [1, 4]] = -np.inf  # masked teacher entries, one with the student masked too
    student = teacher + noise
    student[0, 4] = -np.inf
    return teacher, student


def as_target(teacher):
    """Probabilities from teacher logits (0 where masked), rounded to float32."""
    return softmax(np.float64(teacher), axis=-1).astype("float32")


# The functions whose first derivatives are closed forms: (a, b) -> per-row values, how
# the teacher side enters (logits, or probabilities made from them) and, where it is not
# logits, the student side.
RULES = {
    **{
        f"LogitsDistillation {d} T={t}": (
            lambda a, b, d=d, t=t: kl_keras.LogitsDistillation(t, d, reduction="none")(a, b),
            lambda teacher: teacher,
        )
        for d in ("kl", "reverse_kl", "jeffreys")
        for t in (1.0, 2.5)
    },
    **{
        f"{function.__name__} logits": (
            lambda y, z, function=function: function(y, z, from_logits=True),
            as_target,
        )
        for function in (
            kl_keras.kl_divergence,
            kl_keras.reverse_kl_divergence,
            kl_keras.jeffreys_divergence,
        )
    },
    # Probabilities on both sides.
    "kl_divergence probabilities": (kl_keras.kl_divergence, as_target, as_target),
}


@pytest.mark.parametrize("kind", ["far", "close", "offset", "masked"])
@pytest.mark.parametrize("name", list(RULES))
def test_closed_form_derivatives_are_those_of_the_traced_core(monkeypatch, name, kind):
    function, teacher_side, *student_side = RULES[name]
    teacher, student = rule_inputs(kind)
    a = teacher_side(teacher)
    if student_side:
        student = student_side[0](student)
    value, (grad_a, grad_b) = value_and_grad(function, a, student)
    # The same value traced by the backend's own autodiff, derivatives and all.
    monkeypatch.setattr(
        _kernels, "with_derivatives", lambda f, a, b, axis, exact_zeros=False: f(a, b, False)[0]
    )
    traced, (traced_a, traced_b) = value_and_grad(function, a, student)
    np.testing.assert_allclose(value, traced, rtol=1e-6)  # the same forward pass
    if kind == "masked" and teacher_side is as_target:
        # A zero target where the student is masked too: nothing depends on it, and the
        # closed form says 0; the traced reverse KL says 1 there, the derivative of its
        # bookkeeping of sum(y_true) (which leaves zero targets out), not of the value.
        both = (a == 0) & np.isneginf(student)
        assert np.all(grad_a[both] == 0.0)
        grad_a, traced_a = grad_a[~both], traced_a[~both]
    for grad, expected in ((grad_a, traced_a), (grad_b, traced_b)):
        finite = np.isfinite(expected)
        scale = np.max(np.abs(expected[finite]))
        np.testing.assert_allclose(grad[finite], expected[finite], rtol=1e-5, atol=1e-6 * scale)
        assert np.array_equal(np.isfinite(grad), finite)
    if kind == "masked":
        # Masked on both sides: no gradient through the student's masked entry.
        assert grad_b[0, 4] == 0.0 and np.all(np.isfinite(grad_b))


def test_kl_on_probabilities_closed_form():
    # The closed-form derivatives (traced on TensorFlow), the floor, zero targets and the
    # NaN rule: a negative q makes its row NaN, also where the target is 0, and the
    # gradient where the target is 0 (and q valid) stays 0.
    q = softmax(np.float64(Z), axis=-1).astype("float32")
    q[1, 3] = 0.0  # floored at epsilon
    p, q = np.concatenate([P, P[:2], P[:1]]), np.concatenate([q, q[:2], q[:1]])
    q[5, 2] = -0.1  # negative where the target is 0 (P[0, 2] = 0)
    q[6, 0] = np.nan
    q[7, 4] = -0.1  # negative where the target is not 0
    values = keras.ops.convert_to_numpy(kl_keras.kl_divergence(p, q))
    _, (grad_p, grad_q) = value_and_grad(kl_keras.kl_divergence, p, q)
    floor = np.maximum(np.float64(q[:5]), ref.EPSILON)
    np.testing.assert_allclose(values[:5], kl(np.float64(p[:5]), floor), rtol=2e-6)
    np.testing.assert_allclose(grad_q[:5], -p[:5] / floor, rtol=2e-6)
    log_ratio = np.log(np.where(p[:5] == 0, 1.0, p[:5] / floor))
    np.testing.assert_allclose(grad_p[:5], np.where(p[:5] == 0, 0.0, log_ratio + 1), rtol=2e-6)
    assert np.all(np.isnan(values[5:])) and np.all(np.isnan(grad_p[5:]))
    assert np.all(np.isnan(np.delete(grad_q[5], 2))) and np.all(np.isnan(grad_q[6]))
    assert grad_q[7, 2] == 0.0 and np.all(np.isnan(np.delete(grad_q[7], 2)))
