"""The KL family (reverse, Jeffreys, Jensen-Shannon, binary) and its metric twins.

Values and gradients against the float64 references of `reference.py`; the autodiff modes are
in test_autodiff.py, where each divergence has its lines.
"""

import inspect
import math

import keras
import numpy as np
import pytest
import reference as ref
from helpers import to_numpy, value_and_grad
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit, rel_entr, softmax

import kl_keras

RNG = np.random.default_rng(9)
EPSILON = ref.EPSILON
P = np.array([0.7, 0.2, 0.1])
Q = np.array([0.2, 0.5, 0.3])


def forward(p, q):
    return ref.on_probabilities("kl", p, q)


def reverse(p, q):
    return ref.on_probabilities("reverse_kl", p, q)


def jeffreys(p, q):
    return ref.on_probabilities("jeffreys", p, q)


def jsd(p, q, beta=0.5):
    return ref.on_probabilities("jensen_shannon", p, q, beta)


def binary(p, q):
    return ref.on_probabilities("binary_kl", p, q)


# name -> (function, loss class, metric class, float64 reference)
FAMILY = {
    "reverse_kl": (
        kl_keras.reverse_kl_divergence,
        kl_keras.ReverseKLDivergence,
        kl_keras.metrics.ReverseKLDivergence,
        reverse,
    ),
    "jeffreys": (
        kl_keras.jeffreys_divergence,
        kl_keras.JeffreysDivergence,
        kl_keras.metrics.JeffreysDivergence,
        jeffreys,
    ),
    "jensen_shannon": (
        kl_keras.jensen_shannon_divergence,
        kl_keras.JensenShannonDivergence,
        kl_keras.metrics.JensenShannonDivergence,
        jsd,
    ),
    "binary_kl": (
        kl_keras.binary_kl_divergence,
        kl_keras.BinaryKLDivergence,
        kl_keras.metrics.BinaryKLDivergence,
        binary,
    ),
}
DISTRIBUTIONS = ["reverse_kl", "jeffreys", "jensen_shannon"]


def predictions(q, from_logits, name):
    """The `y_pred` that stands for the probabilities `q`: q itself or logits of it."""
    if not from_logits:
        return q
    if name == "binary_kl":
        return np.log(q) - np.log1p(-q)
    return np.log(q) + 1.3  # any shift


# ---------------------------------------------------------------- the math contract

PINNED = [
    # Computed in float64 with the references of reference.py, as quoted in the issue.
    (kl_keras.kl_divergence, {}, P, Q, 0.5838147),
    (kl_keras.reverse_kl_divergence, {}, P, Q, 0.5371765),
    (kl_keras.jeffreys_divergence, {}, P, Q, 1.1209912),
    (kl_keras.jensen_shannon_divergence, {}, P, Q, 0.1329180),
    (kl_keras.jensen_shannon_divergence, {"beta": 0.25}, P, Q, 0.2307350),
    (kl_keras.jensen_shannon_divergence, {"beta": 0.001}, P, Q, 0.5816714),
    (kl_keras.jensen_shannon_divergence, {"beta": 0.999}, P, Q, 0.5354346),
    (kl_keras.binary_kl_divergence, {}, P[:2], np.array([0.4, 0.5]), 0.3765317),
]


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("case", range(len(PINNED)))
def test_pinned_values(case, from_logits):
    function, kwargs, p, q, expected = PINNED[case]
    name = "binary_kl" if function is kl_keras.binary_kl_divergence else ""
    y = predictions(q, from_logits, name).astype("float32")
    value = function(p.astype("float32"), y, from_logits=from_logits, **kwargs)
    np.testing.assert_allclose(to_numpy(value), expected, atol=1e-6)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILY))
@pytest.mark.parametrize("zeros", [False, True])
def test_matches_float64_reference(name, from_logits, zeros):
    function, _, _, reference = FAMILY[name]
    if name == "binary_kl":
        p = RNG.uniform(size=(6, 5))
        p[RNG.random(p.shape) < 0.3 * zeros] = 0.0
        q = RNG.uniform(0.01, 0.99, size=(6, 5))
    else:
        p = RNG.dirichlet(np.ones(5), size=6)
        p[RNG.random(p.shape) < 0.3 * zeros] = 0.0
        p[:, 0] += 1e-3  # no all-zero row
        p = p / p.sum(-1, keepdims=True)
        q = RNG.dirichlet(np.ones(5), size=6)
    p, q = p.astype("float32"), q.astype("float32")
    y = predictions(np.float64(q), from_logits, name).astype("float32")
    q64 = np.float64(y)
    if from_logits:
        q64 = expit(q64) if name == "binary_kl" else softmax(q64, axis=-1)
    value, (grad_p, grad_y) = value_and_grad(
        lambda t, u: function(t, u, from_logits=from_logits), p, y
    )
    expected = reference(np.float64(p), q64)
    np.testing.assert_allclose(
        to_numpy(function(p, y, from_logits=from_logits)), expected, rtol=2e-5
    )
    assert np.all(np.isfinite(grad_p)) and np.all(np.isfinite(grad_y))


@pytest.mark.parametrize("alpha", [0.05, 1.0, 20.0, "one-hot"])
@pytest.mark.parametrize("name", ["kl"] + sorted(FAMILY))
def test_float32_relative_error_on_dirichlet_inputs(name, alpha):
    rng = np.random.default_rng(3)
    function, reference = (
        (kl_keras.kl_divergence, forward) if name == "kl" else (FAMILY[name][0], FAMILY[name][3])
    )
    a = 1.0 if alpha == "one-hot" else alpha
    p = rng.dirichlet(np.full(10, a), size=64)
    if alpha == "one-hot":
        p = np.eye(10)[rng.integers(0, 10, 64)]
    q = rng.dirichlet(np.full(10, a), size=64)
    if name == "binary_kl":
        p, q = rng.beta(a, a, size=(64, 10)), rng.beta(a, a, size=(64, 10))
        if alpha == "one-hot":
            p = np.round(p)
    p32, q32 = p.astype("float32"), q.astype("float32")
    # The float64 reference on the float32 inputs: what is measured is the computation.
    expected = reference(np.float64(p32), np.float64(q32))
    value = to_numpy(function(p32, q32))
    np.testing.assert_allclose(value, expected, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("tiny", [1e-20, 1e-39, 1e-44])
def test_jensen_shannon_survives_tiny_probabilities(tiny):
    # One side tiny where the other is not. Below float32's smallest normal number a ratio
    # such as P / Q overflows (PyTorch keeps subnormals; XLA flushes them to 0): JSD stays
    # finite and exact, and so does its gradient.
    p = np.array([[0.5, 0.5 - tiny, tiny], [tiny, 0.3, 0.7 - tiny]], dtype="float32")
    q = np.array([[tiny, 0.6, 0.4 - tiny], [0.2, 0.8 - tiny, tiny]], dtype="float32")
    p64, q64 = np.float64(p), np.float64(q)
    for beta in (0.001, 0.5, 0.999):
        value = to_numpy(kl_keras.jensen_shannon_divergence(p, q, beta=beta))
        np.testing.assert_allclose(value, jsd(p64, q64, beta), rtol=2e-6, err_msg=str(beta))
        _, (grad_p, grad_q) = value_and_grad(
            lambda t, u, beta=beta: kl_keras.jensen_shannon_divergence(t, u, beta=beta), p, q
        )
        assert np.all(np.isfinite(grad_p)) and np.all(np.isfinite(grad_q)), beta
        if tiny < np.finfo("float32").tiny:
            continue  # a subnormal's own derivative depends on whether it is flushed to 0
        # The partial derivatives of the formula, M = beta P + (1 - beta) Q, in float64.
        m = beta * p64 + (1 - beta) * q64
        cross = ((1 - beta) * p64 + beta * q64) / m
        expected_p = (1 - beta) * (np.log(p64 / m) + 1) - beta * cross
        expected_q = beta * (np.log(q64 / m) + 1) - (1 - beta) * cross
        np.testing.assert_allclose(grad_p, expected_p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_q, expected_q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kl"] + DISTRIBUTIONS)
def test_masked_logits_are_exact(name):
    # A class masked with a -inf logit and no target mass drops out exactly: the value is
    # the divergence over the other classes, every gradient finite, the masked one 0.
    function, reference = (
        (kl_keras.kl_divergence, forward) if name == "kl" else (FAMILY[name][0], FAMILY[name][3])
    )
    p = np.array([[0.6, 0.0, 0.4], [0.0, 0.5, 0.5]], dtype="float32")
    z = np.array([[1.0, -np.inf, 2.0], [-np.inf, 0.3, -0.7]], dtype="float32")
    value, (_, grad_z) = value_and_grad(lambda t, u: function(t, u, from_logits=True), p, z)
    kept = np.isfinite(z)
    expected = sum(
        reference(np.float64(p[i][kept[i]]), softmax(np.float64(z[i][kept[i]]))) for i in range(2)
    )
    np.testing.assert_allclose(value, expected, rtol=2e-6)
    assert np.all(np.isfinite(grad_z[kept])) and np.all(grad_z[~kept] == 0.0)


def test_binary_kl_gradient_at_zero_logits():
    # d/dz sum KL(Bernoulli(p) || Bernoulli(sigmoid(z))) = sigmoid(z) - p; 0.5 - p at z = 0,
    # where log_sigmoid's two branches meet.
    p = np.array([[0.1, 0.5, 0.9, 0.0, 1.0]], dtype="float32")
    z = np.zeros_like(p)
    _, (_, grad_z) = value_and_grad(
        lambda t, u: kl_keras.binary_kl_divergence(t, u, from_logits=True), p, z
    )
    np.testing.assert_allclose(grad_z, 0.5 - p, rtol=1e-6, atol=1e-7)


def test_binary_kl_infinite_logits_that_agree_with_the_target_give_zero():
    p = np.array([[1.0, 0.0, 0.3]], dtype="float32")
    z = np.array([[np.inf, -np.inf, 0.4]], dtype="float32")
    value = to_numpy(kl_keras.binary_kl_divergence(p, z, from_logits=True))
    np.testing.assert_allclose(value, binary(np.float64(p[:, 2:]), expit(0.4)), rtol=2e-6)


def test_jensen_shannon_is_continuous_at_both_ends():
    p, q = P.astype("float32"), Q.astype("float32")
    js = kl_keras.jensen_shannon_divergence
    fwd, rev = float(kl_keras.kl_divergence(p, q)), float(kl_keras.reverse_kl_divergence(p, q))
    assert float(js(p, q, beta=0.0)) == fwd and float(js(p, q, beta=1.0)) == rev
    for beta, end in [(1e-6, fwd), (1 - 1e-6, rev)]:
        np.testing.assert_allclose(float(js(p, q, beta=beta)), end, rtol=1e-4)
    # TRL's interior form, (1-b) KL(P‖M) + b KL(Q‖M) with M = (1-b) P + b Q swapped
    # weights, gives 0.00058 at beta = 0.001; ours stays next to forward KL.
    assert abs(float(js(p, q, beta=0.001)) - fwd) < 3e-3


@pytest.mark.parametrize("name", DISTRIBUTIONS + ["kl"])
def test_equal_distributions_give_exactly_zero_with_finite_gradients(name):
    function = kl_keras.kl_divergence if name == "kl" else FAMILY[name][0]
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], "float32")
    value, (grad_p, grad_q) = value_and_grad(function, p, p)
    assert value == 0.0
    assert np.all(np.isfinite(grad_p)) and np.all(np.isfinite(grad_q))


def test_reverse_kl_where_the_target_is_zero_is_large_finite_and_pushes_down():
    p = np.array([[1.0, 0.0]], "float32")
    q = np.array([[0.9, 0.1]], "float32")
    value, (_, grad_q) = value_and_grad(kl_keras.reverse_kl_divergence, p, q)
    expected = 0.9 * np.log(0.9) + 0.1 * np.log(0.1 / EPSILON)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    # d/dq1 of q1 log(q1 / eps) = log(q1 / eps) + 1 > 0: gradient descent lowers q1.
    np.testing.assert_allclose(grad_q[0, 1], np.log(0.1 / EPSILON) + 1, rtol=1e-5)


def test_binary_kl_is_binary_crossentropy_minus_the_entropy():
    p = RNG.uniform(size=(4, 6)).astype("float32")
    q = RNG.uniform(0.05, 0.95, size=(4, 6)).astype("float32")
    bce = to_numpy(keras.losses.binary_crossentropy(p, q)) * 6  # Keras averages over axis
    entropy = -np.sum(rel_entr(p, 1) + rel_entr(1 - p, 1), -1)  # sum of -p log p terms
    np.testing.assert_allclose(
        to_numpy(kl_keras.binary_kl_divergence(p, q)), bce - entropy, rtol=1e-4
    )


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_size_one_class_axis_is_refused(name):
    with pytest.raises(ValueError, match="SparseCategoricalCrossentropy"):
        FAMILY[name][0](np.ones((4, 1), "float32"), np.full((4, 10), 0.1, "float32"))


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_negative_or_nan_targets_give_nan_values_and_gradients(name, from_logits):
    function = FAMILY[name][0]
    y = predictions(np.array([[0.2, 0.5, 0.3]] * 3), from_logits, name).astype("float32")
    p = np.array([[-0.1, 0.6, 0.5], [np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]], "float32")
    value, (grad_p, grad_y) = value_and_grad(
        lambda t, u: function(t, u, from_logits=from_logits), p, y
    )
    values = to_numpy(function(p, y, from_logits=from_logits))
    assert np.all(np.isnan(values[:2])) and np.isfinite(values[2])
    assert np.all(np.isnan(grad_p[:2])) and np.all(np.isnan(grad_y[:2]))
    assert np.all(np.isfinite(grad_p[2])) and np.all(np.isfinite(grad_y[2]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_half_precision_is_computed_in_float32(name, dtype):
    function = FAMILY[name][0]
    p = RNG.dirichlet(np.ones(8), size=4).astype("float32")
    q = RNG.dirichlet(np.ones(8), size=4).astype("float32")
    p_half, q_half = keras.ops.cast(p, dtype), keras.ops.cast(q, dtype)
    value = function(p_half, q_half)
    assert keras.backend.standardize_dtype(value.dtype) == dtype
    expected = to_numpy(
        function(keras.ops.cast(p_half, "float32"), keras.ops.cast(q_half, "float32"))
    )
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(value, "float32")), expected, rtol=1e-2, atol=1e-3
    )


# ---------------------------------------------------------------- the loss classes


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_loss_class_reduces_like_keras(name):
    function, cls, _, _ = FAMILY[name]
    p = RNG.dirichlet(np.ones(5), size=8).astype("float32")
    z = RNG.normal(size=(8, 5)).astype("float32")
    w = RNG.random(8).astype("float32")
    per_sample = to_numpy(function(p, z, from_logits=True))
    for reduction, expected in [
        ("sum", np.sum(per_sample * w)),
        ("sum_over_batch_size", np.sum(per_sample * w) / 8),
        ("mean_with_sample_weight", np.sum(per_sample * w) / np.sum(w)),
    ]:
        loss = cls(from_logits=True, reduction=reduction)
        np.testing.assert_allclose(to_numpy(loss(p, z, sample_weight=w)), expected, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_loss_config_round_trip_and_registered_name(name):
    _, cls, _, _ = FAMILY[name]
    kwargs = {"from_logits": True, "axis": 1, "reduction": "sum", "name": "x", "dtype": "float16"}
    if cls is kl_keras.JensenShannonDivergence:
        kwargs["beta"] = 0.25
    loss = cls(**kwargs)
    config = loss.get_config()
    assert config == kwargs
    arguments = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert arguments == set(config)
    assert cls.from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(loss)
    assert serialized["registered_name"] == f"kl_keras>{cls.__name__}"
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config
    assert (
        keras.saving.get_registered_name(FAMILY[name][0]) == f"kl_keras>{FAMILY[name][0].__name__}"
    )


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"beta": -0.1}, ValueError, "beta=-0.1"),
        ({"beta": 1.5}, ValueError, "beta=1.5"),
        ({"beta": float("nan")}, ValueError, "beta=nan"),
        ({"beta": "half"}, TypeError, "beta='half'"),
        ({"from_logits": "yes"}, TypeError, "from_logits='yes'"),
        ({"axis": 1.0}, TypeError, "axis=1.0"),
    ],
)
def test_invalid_arguments_are_refused_when_built(kwargs, error, words):
    for cls in (kl_keras.JensenShannonDivergence, kl_keras.metrics.JensenShannonDivergence):
        with pytest.raises(error, match=words):
            cls(**kwargs)
    with pytest.raises(error, match=words):
        kl_keras.jensen_shannon_divergence(P, Q, **kwargs)


# ---------------------------------------------------------------- the metric twins


@pytest.mark.parametrize("name", ["kl"] + sorted(FAMILY))
def test_metric_is_the_weighted_running_mean(name):
    if name == "kl":
        function, metric = kl_keras.kl_divergence, kl_keras.metrics.KLDivergence(from_logits=True)
    else:
        function, metric = FAMILY[name][0], FAMILY[name][2](from_logits=True)
    batches = [
        (
            RNG.dirichlet(np.ones(4), size=n).astype("float32"),
            RNG.normal(size=(n, 4)).astype("float32"),
            RNG.random(n).astype("float32"),
        )
        for n in (5, 3)
    ]
    for p, z, w in batches:
        metric.update_state(p, z, sample_weight=w)
    values = np.concatenate([to_numpy(function(p, z, from_logits=True)) for p, z, _ in batches])
    weights = np.concatenate([w for _, _, w in batches])
    np.testing.assert_allclose(
        float(metric.result()), np.sum(values * weights) / np.sum(weights), rtol=1e-5
    )
    config = metric.get_config()
    assert type(metric).from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(metric)
    assert serialized["registered_name"] == f"kl_keras.metrics>{type(metric).__name__}"


def test_metrics_work_in_weighted_metrics():
    x = RNG.normal(size=(64, 6)).astype("float32")
    y = softmax(RNG.normal(size=(64, 3)), axis=-1).astype("float32")
    w = RNG.random(64).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    metric = kl_keras.metrics.JensenShannonDivergence(from_logits=True, name="js")
    model.compile("sgd", loss=kl_keras.KLDivergence(from_logits=True), weighted_metrics=[metric])
    result = model.evaluate(x, y, sample_weight=w, verbose=0, return_dict=True)
    per_sample = to_numpy(
        kl_keras.jensen_shannon_divergence(y, model.predict(x, verbose=0), from_logits=True)
    )
    np.testing.assert_allclose(result["js"], np.sum(per_sample * w) / np.sum(w), rtol=1e-4)


# ---------------------------------------------------------------- properties

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def pair(draw):
    rows, classes = draw(st.integers(1, 3)), draw(st.integers(2, 7))
    entry = st.one_of(st.just(0.0), st.floats(1e-2, 10.0))
    p = np.array(draw(st.lists(entry, min_size=rows * classes, max_size=rows * classes)))
    q = np.array(
        draw(st.lists(st.floats(1e-2, 10.0), min_size=rows * classes, max_size=rows * classes))
    )
    p, q = p.reshape(rows, classes), q.reshape(rows, classes)
    p[:, 0] += 1e-2
    return [(x / x.sum(-1, keepdims=True)).astype("float32") for x in (p, q)]


@PROPERTY
@given(pair())
def test_property_directions_and_symmetries(case):
    p, q = case
    fwd = to_numpy(kl_keras.kl_divergence(p, q))
    rev = to_numpy(kl_keras.reverse_kl_divergence(p, q))
    np.testing.assert_allclose(rev, to_numpy(kl_keras.kl_divergence(q, p)), rtol=1e-6)
    jef = to_numpy(kl_keras.jeffreys_divergence(p, q))
    np.testing.assert_allclose(jef, fwd + rev, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jef, to_numpy(kl_keras.jeffreys_divergence(q, p)), rtol=1e-5, atol=1e-6
    )
    js = to_numpy(kl_keras.jensen_shannon_divergence(p, q))
    np.testing.assert_allclose(
        js, to_numpy(kl_keras.jensen_shannon_divergence(q, p)), rtol=1e-5, atol=1e-6
    )
    assert np.all(js <= math.log(2) + 1e-6)
    for value in (fwd, rev, jef, js):
        assert np.all(value >= -1e-6), value


@PROPERTY
@given(pair(), st.randoms(), st.floats(-30.0, 30.0))
def test_property_invariances(case, random, shift):
    p, q = case
    order = list(range(p.shape[-1]))
    random.shuffle(order)
    z = np.log(q)
    for function in (kl_keras.reverse_kl_divergence, kl_keras.jeffreys_divergence) + (
        kl_keras.jensen_shannon_divergence,
    ):
        original = to_numpy(function(p, z, from_logits=True))
        permuted = to_numpy(function(p[:, order], z[:, order], from_logits=True))
        shifted = to_numpy(function(p, z + np.float32(shift), from_logits=True))
        np.testing.assert_allclose(permuted, original, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(shifted, original, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(
            original, to_numpy(function(p, q)), rtol=1e-4, atol=2e-5
        )  # logits and probabilities agree
        assert np.all(to_numpy(function(p, p)) == 0.0)
