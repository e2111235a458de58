"""KLActivityRegularizer against a float64 numpy reference, alone and inside models."""

import inspect

import keras
import numpy as np
import pytest
import reference as ref
from helpers import to_numpy, value_and_grad
from sklearn.datasets import load_digits

from kl_keras import KLActivityRegularizer
from kl_keras.regularizers import KERAS_DIVIDES_BY_BATCH_SIZE

RNG = np.random.default_rng(7)
EPSILON = ref.EPSILON


def reference_penalty(x, rho, beta):
    """β·Σ_j KL(ρ ‖ ρ̂_j) in float64, ρ̂_j the mean over every axis but the last."""
    return ref.sparsity_penalty(x, rho, beta)


@pytest.mark.parametrize("shape", [(16, 8), (4, 5, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("rho, beta", [(0.05, 0.01), (0.3, 2.0), (0.9, 1.0)])
def test_penalty_matches_reference(shape, rho, beta):
    x = RNG.random(shape).astype("float32")
    penalty = to_numpy(KLActivityRegularizer(rho=rho, beta=beta).penalty(x))
    assert penalty.shape == ()
    np.testing.assert_allclose(penalty, reference_penalty(x, rho, beta), rtol=1e-5)


def test_penalty_is_zero_at_target_and_positive_elsewhere():
    reg = KLActivityRegularizer(rho=0.2, beta=1.0)
    assert abs(float(to_numpy(reg.penalty(np.full((4, 3), 0.2, "float32"))))) < 1e-6
    assert float(to_numpy(reg.penalty(np.full((4, 3), 0.6, "float32")))) > 0.1


def test_equals_the_seed_formula_users_copy():
    # The penalty as users write it today from Keras's kld, with mean = ops.mean(x, axis=0).
    x = RNG.uniform(0.01, 0.99, size=(32, 10)).astype("float32")
    mean = keras.ops.mean(x, axis=0)
    kld = keras.losses.kl_divergence
    seed = 0.01 * (kld(0.05, mean) + kld(0.95, 1 - mean))
    ours = KLActivityRegularizer(rho=0.05, beta=0.01).penalty(x)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(seed), rtol=1e-6)


def test_rank_one_activations_are_one_unit():
    x = RNG.random(9).astype("float32")
    penalty = KLActivityRegularizer(rho=0.1, beta=1.0).penalty(x)
    np.testing.assert_allclose(
        to_numpy(penalty), reference_penalty(x[:, None], 0.1, 1.0), rtol=1e-5
    )


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_model_losses_hold_the_penalty_at_every_batch_size(batch_size):
    reg = KLActivityRegularizer(rho=0.1, beta=0.5)
    layer = keras.layers.Dense(6, activation="sigmoid", activity_regularizer=reg)
    x = RNG.normal(size=(batch_size, 4)).astype("float32")
    out = layer(x)
    (loss,) = layer.losses
    np.testing.assert_allclose(
        to_numpy(loss), reference_penalty(to_numpy(out), 0.1, 0.5), rtol=1e-5
    )


def test_direct_call_is_what_keras_expects():
    # Keras >= 3.14 divides reg(x) by the batch size (keras-team/keras#22018); reg(x)
    # undoes that division so that model.losses holds reg.penalty(x).
    x = RNG.random((5, 3)).astype("float32")
    reg = KLActivityRegularizer(rho=0.1, beta=0.5)
    scale = 5.0 if KERAS_DIVIDES_BY_BATCH_SIZE else 1.0
    np.testing.assert_allclose(to_numpy(reg(x)), scale * to_numpy(reg.penalty(x)), rtol=1e-6)
    major, minor = (int(v) for v in keras.__version__.split(".")[:2])
    assert KERAS_DIVIDES_BY_BATCH_SIZE == ((major, minor) >= (3, 14))


@pytest.mark.parametrize(
    "activations",
    [np.zeros((8, 4)), np.ones((8, 4)), np.full((8, 4), 3.0)],
    ids=["all-zero", "saturated-sigmoid", "relu-above-one"],
)
def test_saturated_and_out_of_range_activations_are_finite_with_a_gradient(activations):
    reg = KLActivityRegularizer(rho=0.05, beta=1.0)
    value, (grad,) = value_and_grad(reg.penalty, activations.astype("float32"))
    np.testing.assert_allclose(value, reference_penalty(activations, 0.05, 1.0), rtol=1e-4)
    assert np.all(np.isfinite(grad)) and np.all(grad != 0)
    # The gradient pushes the mean back toward rho.
    assert np.all(np.sign(grad) == np.sign(activations.mean() - 0.05))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_activations_are_computed_in_float32(dtype):
    reg = KLActivityRegularizer(rho=0.05, beta=1.0)
    x = RNG.random((16, 8)).astype("float32")
    x_half = keras.ops.cast(x, dtype)
    penalty = reg.penalty(x_half)
    assert keras.backend.standardize_dtype(penalty.dtype) == "float32"
    expected = reference_penalty(to_numpy(keras.ops.cast(x_half, "float32")), 0.05, 1.0)
    np.testing.assert_allclose(to_numpy(penalty), expected, rtol=1e-5)
    for saturated in (np.zeros((4, 3)), np.ones((4, 3))):
        assert np.isfinite(to_numpy(reg.penalty(keras.ops.cast(saturated, dtype))))


def test_gradient_matches_finite_differences():
    x = RNG.uniform(0.05, 0.95, size=(4, 3)).astype("float32")
    _, (grad,) = value_and_grad(KLActivityRegularizer(rho=0.2, beta=1.5).penalty, x)
    step = 1e-6
    expected = np.zeros((4, 3))
    for index in np.ndindex(x.shape):
        plus, minus = np.float64(x), np.float64(x)
        plus[index] += step
        minus[index] -= step
        expected[index] = (
            reference_penalty(plus, 0.2, 1.5) - reference_penalty(minus, 0.2, 1.5)
        ) / (2 * step)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_an_empty_batch_adds_zero_with_a_zero_gradient():
    reg = KLActivityRegularizer(rho=0.1, beta=0.5)
    value, (grad,) = value_and_grad(reg.penalty, np.zeros((0, 4), "float32"))
    assert value == 0.0 and grad.shape == (0, 4)
    # Inside a layer, on Keras before 3.14 (no division) and after (divide_no_nan).
    layer = keras.layers.Dense(4, activation="sigmoid", activity_regularizer=reg)
    layer(np.zeros((0, 3), "float32"))
    (loss,) = layer.losses
    assert float(to_numpy(loss)) == 0.0


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"rho": 0.0}, ValueError, "rho=0.0"),
        ({"rho": 1.0}, ValueError, "rho=1.0"),
        ({"rho": 1.5}, ValueError, "rho=1.5"),
        ({"rho": -0.1}, ValueError, "rho=-0.1"),
        ({"rho": float("nan")}, ValueError, "rho=nan"),
        ({"rho": "0.1"}, TypeError, "rho='0.1'"),
        ({"rho": True}, TypeError, "rho=True"),
        ({"beta": -1.0}, ValueError, "beta=-1.0"),
        ({"beta": float("nan")}, ValueError, "beta=nan"),
        ({"beta": float("inf")}, ValueError, "beta=inf"),
        ({"beta": None}, TypeError, "beta=None"),
        ({"beta": "x"}, TypeError, "beta='x'"),
    ],
)
def test_invalid_arguments_are_refused_when_built(kwargs, error, words):
    with pytest.raises(error, match=f"argument `{next(iter(kwargs))}`.*{words}"):
        KLActivityRegularizer(**kwargs)


def test_config_round_trip():
    reg = KLActivityRegularizer(rho=np.float32(0.25), beta=3)
    config = reg.get_config()
    assert config == {"rho": 0.25, "beta": 3.0}
    assert all(type(v) is float for v in config.values())
    assert KLActivityRegularizer.from_config(config).get_config() == config
    arguments = set(inspect.signature(KLActivityRegularizer.__init__).parameters) - {"self"}
    assert arguments == set(config)
    serialized = keras.saving.serialize_keras_object(reg)
    assert serialized["registered_name"] == "kl_keras>KLActivityRegularizer"
    assert keras.regularizers.get(serialized).get_config() == config


def test_unknown_config_keys_are_refused():
    with pytest.raises(ValueError, match="unknown keys \\['sparsity'\\]"):
        KLActivityRegularizer.from_config({"rho": 0.1, "beta": 1.0, "sparsity": 0.1})


def test_rank_zero_activations_are_refused():
    with pytest.raises(ValueError, match=r"rank >= 1.*x.shape=\(\)"):
        KLActivityRegularizer().penalty(np.float32(0.5))


# ---------------------------------------------------------------- in training


def digits():
    x = load_digits().data.astype("float32") / 16.0
    return x


def test_training_drives_mean_activation_toward_rho():
    x = digits()
    rho = 0.05

    def mean_hidden_activation(regularizer):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((64,))
        hidden = keras.layers.Dense(
            32, activation="sigmoid", activity_regularizer=regularizer, name="code"
        )(inputs)
        outputs = keras.layers.Dense(64, activation="sigmoid")(hidden)
        model = keras.Model(inputs, outputs)
        model.compile(keras.optimizers.Adam(1e-2), "mse")
        model.fit(x, x, batch_size=64, epochs=15, verbose=0)
        encoder = keras.Model(inputs, hidden)
        return float(np.mean(to_numpy(encoder.predict(x, verbose=0))))

    free = mean_hidden_activation(None)
    sparse = mean_hidden_activation(KLActivityRegularizer(rho=rho, beta=0.5))
    assert abs(sparse - rho) < 0.02, sparse
    assert abs(free - rho) > 0.2, free


@pytest.mark.parametrize("kind", ["dense", "conv2d", "lstm"])
def test_regularized_layers_train(kind):
    reg = KLActivityRegularizer(rho=0.1, beta=0.1)
    x = digits()[:128].reshape(128, 8, 8, 1)
    y = keras.ops.one_hot(load_digits().target[:128], 10)
    layers = {
        "dense": [
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="sigmoid", activity_regularizer=reg),
        ],
        "conv2d": [
            keras.layers.Conv2D(4, 3, activation="sigmoid", activity_regularizer=reg),
            keras.layers.Flatten(),
        ],
        "lstm": [
            keras.layers.Reshape((8, 8)),
            keras.layers.LSTM(
                8, activation="sigmoid", return_sequences=True, activity_regularizer=reg
            ),
            keras.layers.Flatten(),
        ],
    }[kind]
    inputs = keras.Input((8, 8, 1))
    hidden = inputs
    for layer in layers:
        hidden = layer(hidden)
        if layer.activity_regularizer is not None:
            activations = keras.Model(inputs, hidden)
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    model.compile("adam", keras.losses.CategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=32, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # The regularizer's term in the model's losses is the penalty of that layer's output.
    model(x[:32])
    (penalty,) = model.losses
    expected = reg.penalty(activations(x[:32]))
    np.testing.assert_allclose(to_numpy(penalty), to_numpy(expected), rtol=1e-5)
