"""kl_divergence / kld and KLDivergence against a float64 scipy reference."""

import math

import keras
import numpy as np
import pytest
import reference as ref
from helpers import to_numpy, value_and_grad
from scipy.special import log_softmax, softmax

import kl_keras
from kl_keras import KLDivergence, kl_divergence

RNG = np.random.default_rng(20261121)


def reference_kl(p, q, axis=-1):
    """KL(p ‖ q) in float64 (reference.py), 0·log 0 = 0, q floored at epsilon."""
    return ref.on_probabilities("kl", p, q, axis=axis)


def random_distributions(shape, zero_fraction=0.0, axis=-1):
    """Random probability vectors along `axis`, some entries exactly 0."""
    x = RNG.gamma(1.0, size=shape)
    x[RNG.random(shape) < zero_fraction] = 0.0
    x = np.moveaxis(x, axis, -1)
    x[..., 0] += 1e-3  # no all-zero row
    x = np.moveaxis(x, -1, axis)
    return (x / x.sum(axis=axis, keepdims=True)).astype("float32")


def central_differences(f, x, step=1e-6):
    """d sum(f(x)) / dx by central differences, in float64."""
    x = np.float64(x)
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (np.sum(f(plus)) - np.sum(f(minus))) / (2 * step)
    return grad


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 7), (2, 1000)])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.4])
def test_probabilities_match_scipy(shape, zero_fraction):
    p = random_distributions(shape, zero_fraction)
    q = random_distributions(shape)
    loss = to_numpy(kl_divergence(p, q))
    assert loss.shape == shape[:-1]
    np.testing.assert_allclose(loss, reference_kl(p, q), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 7), (2, 1000)])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.4])
def test_logits_match_scipy(shape, zero_fraction):
    p = random_distributions(shape, zero_fraction)
    z = RNG.normal(scale=3.0, size=shape).astype("float32")
    loss = to_numpy(kl_divergence(p, z, from_logits=True))
    np.testing.assert_allclose(loss, ref.on_target("kl", p, z), rtol=2e-5, atol=1e-6)


def test_zero_targets_are_exact():
    eye = np.eye(10, dtype="float32")
    # KL(p ‖ p) for one-hot p: every term is 1·log(1/1) or 0·log 0, both exactly 0.
    assert np.all(to_numpy(kl_divergence(eye, eye)) == 0.0)
    # KL(one-hot ‖ uniform over 10) = log 10; Keras's clipping gives 2.3025725.
    uniform = np.full((10, 10), 0.1, dtype="float32")
    np.testing.assert_allclose(
        to_numpy(kl_divergence(eye, uniform)), math.log(10), rtol=float(np.finfo("float32").eps)
    )
    # An all-zero target contributes exactly 0 (Keras: -3.08e-06).
    assert to_numpy(kl_divergence([[0.0, 0.0]], [[0.3, 0.7]]))[0] == 0.0


def test_zero_targets_have_finite_gradients():
    p = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype="float32")
    q = np.array([[0.2, 0.0, 0.8], [0.0, 0.5, 0.5]], dtype="float32")
    _, (grad_p, grad_q) = value_and_grad(kl_divergence, p, q)
    assert np.all(np.isfinite(grad_p)) and np.all(np.isfinite(grad_q))
    # Where y_true is 0 the prediction gets no gradient; elsewhere it is -y_true/y_pred.
    np.testing.assert_allclose(grad_q[p == 0], 0.0)
    np.testing.assert_allclose(grad_q[p > 0], -p[p > 0] / q[p > 0], rtol=1e-6)


def test_zero_prediction_gives_large_finite_loss_and_gradient():
    p = np.array([[1.0, 0.0]], dtype="float32")
    q = np.array([[0.0, 1.0]], dtype="float32")
    value, (_, grad_q) = value_and_grad(kl_divergence, p, q)
    epsilon = keras.config.epsilon()
    np.testing.assert_allclose(value, -math.log(epsilon), rtol=1e-6)  # 16.118
    # The floor keeps the gradient: -y_true/epsilon, not 0 as under a clip.
    np.testing.assert_allclose(grad_q, [[-1.0 / epsilon, 0.0]], rtol=1e-6)


# Keras's own KLDivergence test inputs (keras/src/metrics/probabilistic_metrics_test.py).
KERAS_Y_TRUE = np.array([[0.5, 0.8, 0.12], [0.7, 0.43, 0.8]], dtype="float32")
KERAS_Y_PRED = np.array([[0.4, 0.9, 0.12], [0.36, 0.3, 0.4]], dtype="float32")


@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none"]
)
@pytest.mark.parametrize("sample_weight", [None, 2.3, np.array([1.2, 3.4], "float32")])
def test_equals_keras_for_positive_inputs(reduction, sample_weight):
    ours = KLDivergence(reduction=reduction)(KERAS_Y_TRUE, KERAS_Y_PRED, sample_weight)
    theirs = keras.losses.KLDivergence(reduction=reduction)(
        KERAS_Y_TRUE, KERAS_Y_PRED, sample_weight
    )
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=1e-6)


def test_equals_keras_for_timestep_weights():
    p = random_distributions((3, 4, 5)) + 1e-3
    q = random_distributions((3, 4, 5))
    weights = RNG.random((3, 4)).astype("float32")
    ours = KLDivergence()(p, q, sample_weight=weights)
    theirs = keras.losses.KLDivergence()(p, q, sample_weight=weights)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(theirs), rtol=1e-6)
    expected = np.sum(reference_kl(p, q) * weights) / weights.size
    np.testing.assert_allclose(to_numpy(ours), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "reduction, reduce",
    [
        ("none", lambda v, w: v * w),
        (None, lambda v, w: v * w),
        ("sum", lambda v, w: np.sum(v * w)),
        ("sum_over_batch_size", lambda v, w: np.sum(v * w) / v.size),
        ("mean", lambda v, w: np.sum(v * w) / v.size),
        ("mean_with_sample_weight", lambda v, w: np.sum(v * w) / np.sum(w)),
    ],
)
def test_reductions_with_sample_weights(reduction, reduce):
    p = random_distributions((8, 6), zero_fraction=0.3)
    z = RNG.normal(size=(8, 6)).astype("float32")
    w = RNG.random(8).astype("float32")
    loss = KLDivergence(from_logits=True, reduction=reduction)(p, z, sample_weight=w)
    per_sample = ref.on_target("kl", p, z)
    np.testing.assert_allclose(to_numpy(loss), reduce(per_sample, w), rtol=1e-5)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -2])
def test_axis(axis, from_logits):
    p = random_distributions((4, 5, 3), zero_fraction=0.3, axis=axis)
    y = RNG.normal(size=(4, 5, 3)) if from_logits else random_distributions((4, 5, 3), axis=axis)
    y = y.astype("float32")
    loss = to_numpy(kl_divergence(p, y, from_logits=from_logits, axis=axis))
    p_last, y_last = np.moveaxis(p, axis, -1), np.moveaxis(y, axis, -1)
    if from_logits:
        expected = ref.on_target("kl", p_last, y_last)
    else:
        expected = ref.on_probabilities("kl", p_last, y_last)
    np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=1e-6)


def test_inputs_broadcast():
    p = random_distributions((4, 6))
    q = random_distributions((1, 6))
    np.testing.assert_allclose(to_numpy(kl_divergence(p, q)), reference_kl(p, q), rtol=2e-5)


def test_kld_is_kl_divergence():
    assert kl_keras.kld is kl_keras.kl_divergence


# ---------------------------------------------------------------- from_logits


def test_logit_gradient_is_softmax_minus_target_times_reduction_scale():
    p = random_distributions((5, 7), zero_fraction=0.3)
    z = RNG.normal(scale=2.0, size=(5, 7)).astype("float32")
    _, (_, grad_z) = value_and_grad(lambda t, y: KLDivergence(from_logits=True)(t, y), p, z)
    expected = (softmax(np.float64(z), axis=-1) * p.sum(-1, keepdims=True) - p) / 5
    np.testing.assert_allclose(grad_z, expected, atol=1e-6)


def test_confidently_wrong_logits_do_not_stall():
    p = np.array([[1.0, 0.0, 0.0]], dtype="float32")
    z = np.array([[-20.0, 20.0, 0.0]], dtype="float32")
    value, (_, grad_z) = value_and_grad(lambda t, y: kl_divergence(t, y, from_logits=True), p, z)
    expected = -log_softmax(np.float64(z), axis=-1)[0, 0]  # 40.000000002
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_allclose(grad_z, [[-1.0, 1.0, 0.0]], atol=1e-6)


def test_masked_logits_are_finite():
    p = np.array([[0.7, 0.0, 0.3, 0.0]], dtype="float32")
    z = np.array([[1.0, -np.inf, 2.0, -np.inf]], dtype="float32")
    value, (grad_p, grad_z) = value_and_grad(
        lambda t, y: kl_divergence(t, y, from_logits=True), p, z
    )
    expected = ref.on_target("kl", p[:, [0, 2]], z[:, [0, 2]])
    np.testing.assert_allclose(value, expected.sum(), rtol=1e-6)
    assert np.all(np.isfinite(grad_p)) and np.all(np.isfinite(grad_z))
    np.testing.assert_allclose(grad_z[0, [1, 3]], 0.0)


def test_large_finite_logits_are_finite():
    p = random_distributions((3, 5), zero_fraction=0.3)
    z = (RNG.normal(size=(3, 5)) * 1e4).astype("float32")
    value, (_, grad_z) = value_and_grad(lambda t, y: kl_divergence(t, y, from_logits=True), p, z)
    assert np.isfinite(value) and np.all(np.isfinite(grad_z))


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("from_logits", [False, True])
def test_gradient_matches_finite_differences(from_logits):
    p = random_distributions((3, 4), zero_fraction=0.3)
    if from_logits:
        y = RNG.normal(size=(3, 4)).astype("float32")

        def reference(p64, y64):
            return ref.on_target("kl", p64, y64)
    else:
        y = random_distributions((3, 4)) * 0.9 + 0.025

        def reference(p64, y64):
            return ref.on_probabilities("kl", p64, y64)

    _, (_, grad_y) = value_and_grad(lambda t, q: kl_divergence(t, q, from_logits=from_logits), p, y)
    expected = central_differences(lambda y64: reference(np.float64(p), y64), y)
    np.testing.assert_allclose(grad_y, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_half_precision_inputs(dtype, from_logits):
    p = random_distributions((4, 64), zero_fraction=0.3)
    y = RNG.normal(size=(4, 64)) if from_logits else random_distributions((4, 64))
    y = y.astype("float32")
    full = to_numpy(kl_divergence(p, y, from_logits=from_logits))
    half = kl_divergence(
        keras.ops.cast(p, dtype), keras.ops.cast(y, dtype), from_logits=from_logits
    )
    assert keras.backend.standardize_dtype(half.dtype) == dtype
    tolerance = {"float16": 5e-3, "bfloat16": 4e-2}[dtype]
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(half, "float32")), full, rtol=tolerance, atol=tolerance
    )


def test_half_precision_is_computed_in_float32():
    # log_softmax of these logits underflows in float16 (exp(-30) < 6e-8) but not
    # in float32: float16 arithmetic would give inf, float32 gives 30.
    p = np.array([[1.0, 0.0]], dtype="float16")
    z = np.array([[-15.0, 15.0]], dtype="float16")
    loss = to_numpy(keras.ops.cast(kl_divergence(p, z, from_logits=True), "float32"))
    np.testing.assert_allclose(loss, 30.0, rtol=1e-3)


@pytest.mark.parametrize("dtype", [None, "float32", "float16", "bfloat16", "mixed_float16"])
def test_dtype_argument_behaves_as_in_keras(dtype):
    ours = KLDivergence(dtype=dtype)
    theirs = keras.losses.KLDivergence(dtype=dtype)
    assert ours.dtype == theirs.dtype
    value = ours(KERAS_Y_TRUE, KERAS_Y_PRED)
    expected = theirs(KERAS_Y_TRUE, KERAS_Y_PRED)
    assert keras.backend.standardize_dtype(value.dtype) == keras.backend.standardize_dtype(
        expected.dtype
    )
    np.testing.assert_allclose(
        to_numpy(keras.ops.cast(value, "float32")),
        to_numpy(keras.ops.cast(expected, "float32")),
        rtol=1e-2,
    )


def test_integer_targets_are_cast():
    loss = kl_divergence(np.array([[0, 1, 0]]), np.array([[0.25, 0.5, 0.25]], "float32"))
    np.testing.assert_allclose(to_numpy(loss), [math.log(2)], rtol=1e-6)


# ---------------------------------------------------------------- configuration


def test_config_round_trip():
    loss = KLDivergence(from_logits=True, axis=1, reduction="sum", name="kd", dtype="float16")
    config = loss.get_config()
    assert config == {
        "name": "kd",
        "reduction": "sum",
        "from_logits": True,
        "axis": 1,
        "dtype": "float16",
    }
    rebuilt = KLDivergence.from_config(config)
    assert rebuilt.get_config() == config
    assert rebuilt.dtype == "float16"


def test_every_init_argument_is_in_config():
    import inspect

    arguments = set(inspect.signature(KLDivergence.__init__).parameters) - {"self"}
    assert arguments == set(KLDivergence().get_config())


def test_serialization_uses_the_registered_name():
    serialized = keras.saving.serialize_keras_object(KLDivergence(from_logits=True))
    assert serialized["registered_name"] == "kl_keras>KLDivergence"
    restored = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(restored, KLDivergence) and restored.from_logits is True
    assert keras.saving.get_registered_name(kl_divergence) == "kl_keras>kl_divergence"
    assert keras.saving.get_registered_object("kl_keras>kl_divergence") is kl_divergence


def test_what_works_in_place_of_a_string():
    # Keras resolves only its built-in names from strings: a registered kl_keras name
    # is refused, and the bare "KLDivergence" is Keras's own (clipped) loss.
    for name in ("kl_keras>KLDivergence", "kl_keras>kl_divergence"):
        with pytest.raises(ValueError, match="Could not interpret loss identifier"):
            keras.losses.get(name)
    assert not isinstance(keras.losses.get("KLDivergence"), KLDivergence)
    # The dict form resolves through keras.losses.get (compile() does not take dicts).
    loss = keras.losses.get(
        {"class_name": "kl_keras>KLDivergence", "config": {"from_logits": True}}
    )
    assert isinstance(loss, KLDivergence) and loss.from_logits is True
    # The object itself is what compile() takes.
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3)])
    model.compile("sgd", loss=loss)
    model.fit(np.ones((4, 3), "float32"), np.full((4, 3), 1 / 3, "float32"), verbose=0)
    assert model.loss is loss


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"from_logits": "yes"}, TypeError, "from_logits='yes'"),
        ({"from_logits": 1}, TypeError, "from_logits=1"),
        ({"axis": True}, TypeError, "axis=True"),
        ({"axis": "x"}, TypeError, "axis='x'"),
        ({"axis": 1.5}, TypeError, "axis=1.5"),
        ({"reduction": "avg"}, ValueError, "reduction=avg"),
    ],
)
def test_invalid_arguments_are_refused_when_built(kwargs, error, words):
    with pytest.raises(error, match=words):
        KLDivergence(**kwargs)


@pytest.mark.parametrize(
    "kwargs, words", [({"from_logits": "yes"}, "from_logits='yes'"), ({"axis": True}, "axis=True")]
)
def test_invalid_arguments_are_refused_by_the_function(kwargs, words):
    with pytest.raises(TypeError, match=words):
        kl_divergence(KERAS_Y_TRUE, KERAS_Y_PRED, **kwargs)


def test_unknown_config_keys_are_refused():
    config = KLDivergence().get_config()
    with pytest.raises(ValueError, match="unknown keys \\['temperature'\\]"):
        KLDivergence.from_config(dict(config, temperature=2.0))
    with pytest.raises(TypeError, match="config"):
        KLDivergence.from_config([("axis", -1)])


def test_shapes_that_do_not_broadcast_are_named():
    with pytest.raises(ValueError, match=r"y_true.shape=\(2, 3\), y_pred.shape=\(2, 4\)"):
        kl_divergence(np.ones((2, 3)), np.ones((2, 4)))


@pytest.mark.parametrize("axis", [2, -3])
def test_axis_outside_the_inputs_is_refused(axis):
    with pytest.raises(ValueError, match=f"axis={axis}"):
        kl_divergence(np.ones((2, 3)), np.ones((2, 3)), axis=axis)
