"""Compiled training, mixed precision, and .keras files that cross backends."""

import importlib.util
import json

import keras
import numpy as np
import pytest
from helpers import BACKEND, run_in_fresh_process, to_numpy
from scipy.special import softmax

import kl_keras

RNG = np.random.default_rng(5)
X = RNG.normal(size=(256, 12)).astype("float32")
Y = softmax(X @ RNG.normal(size=(12, 5)), axis=-1).astype("float32")


def build(from_logits):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(
        16,
        activation="sigmoid",
        activity_regularizer=kl_keras.KLActivityRegularizer(0.1, 0.5),
        name="hidden",
    )(inputs)
    logits = keras.layers.Dense(5, name="logits")(hidden)
    # The output layer stays float32 under mixed precision, as Keras recommends.
    outputs = logits if from_logits else keras.layers.Activation("softmax", dtype="float32")(logits)
    return keras.Model(inputs, outputs)


# ---------------------------------------------------------------- compiled training


JIT_MODES = {"tensorflow": [False, True], "jax": [False, True], "torch": [False]}


@pytest.mark.parametrize("jit_compile", JIT_MODES.get(BACKEND, [False]))
@pytest.mark.parametrize("from_logits", [False, True])
def test_compiled_training(jit_compile, from_logits):
    model = build(from_logits)
    model.compile(
        keras.optimizers.Adam(1e-2),
        loss=kl_keras.KLDivergence(from_logits=from_logits),
        jit_compile=jit_compile,
    )
    losses = model.fit(X, Y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("from_logits", [False, True])
def test_mixed_precision_training_matches_float32(policy, from_logits):
    def first_epoch_loss():
        model = build(from_logits)
        model.compile(
            keras.optimizers.SGD(0.1), loss=kl_keras.KLDivergence(from_logits=from_logits)
        )
        return model, model.fit(X, Y, batch_size=32, epochs=2, verbose=0).history["loss"]

    _, full = first_epoch_loss()
    keras.config.set_dtype_policy(policy)
    model, mixed = first_epoch_loss()
    assert model.get_layer("hidden").compute_dtype == policy.split("_")[1]
    assert model.loss.dtype == "float32"  # the loss is computed in float32
    value = model.loss(Y[:8], model(X[:8]))
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    assert np.all(np.isfinite(mixed))
    tolerance = {"mixed_float16": 1e-2, "mixed_bfloat16": 4e-2}[policy]
    np.testing.assert_allclose(mixed[0], full[0], rtol=tolerance)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_saturated_half_precision_activations_give_a_finite_penalty(dtype, fill):
    keras.config.set_dtype_policy(f"mixed_{dtype}")
    layer = keras.layers.Dense(
        4,
        activation="sigmoid",
        kernel_initializer="zeros",
        bias_initializer=keras.initializers.Constant(-100.0 if fill == 0.0 else 100.0),
        activity_regularizer=kl_keras.KLActivityRegularizer(rho=0.05, beta=1.0),
    )
    out = layer(np.ones((8, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == dtype
    assert np.all(to_numpy(keras.ops.cast(out, "float32")) == fill)
    (penalty,) = layer.losses
    expected = 4 * (0.05 * np.log(0.05 / 1e-7) + 0.95 * np.log(0.95 / (1 - 1e-7)))
    if fill == 1.0:
        expected = 4 * (0.05 * np.log(0.05 / (1 - 1e-7)) + 0.95 * np.log(0.95 / 1e-7))
    assert np.isfinite(to_numpy(penalty))
    np.testing.assert_allclose(to_numpy(penalty), expected, rtol=1e-3)


# ---------------------------------------------------------------- across backends

LOAD_ON_OTHER_BACKEND = """
import json
import numpy as np
import keras
import kl_keras

data = np.load("data.npz")
model = keras.models.load_model("model.keras")
hidden = keras.Model(model.input, model.get_layer("hidden").output)
report = {
    "backend": keras.backend.backend(),
    "loss": model.loss.get_config(),
    "regularizer": model.get_layer("hidden").activity_regularizer.get_config(),
    "predict": np.asarray(model.predict(data["x"], verbose=0)).tolist(),
    "loss_value": float(model.loss(data["y"], model.predict(data["x"], verbose=0))),
    "penalty": float(model.get_layer("hidden").activity_regularizer.penalty(hidden(data["x"]))),
}
print(json.dumps(report))
"""

OTHER_BACKENDS = [
    b
    for b in ("tensorflow", "jax", "torch")
    if b != BACKEND and importlib.util.find_spec(b) is not None
]


@pytest.mark.slow
@pytest.mark.parametrize("other", OTHER_BACKENDS)
def test_keras_file_loads_and_predicts_the_same_on_another_backend(tmp_path, other):
    model = build(from_logits=True)
    model.compile("adam", loss=kl_keras.KLDivergence(from_logits=True, reduction="sum"))
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    np.savez(tmp_path / "data.npz", x=X[:64], y=Y[:64])

    output = run_in_fresh_process(LOAD_ON_OTHER_BACKEND, cwd=tmp_path, backend=other)
    report = json.loads(output.strip().splitlines()[-1])
    assert report["backend"] == other
    assert report["loss"] == model.loss.get_config()
    assert report["regularizer"] == {"rho": 0.1, "beta": 0.5}
    predictions = to_numpy(model.predict(X[:64], verbose=0))
    np.testing.assert_allclose(report["predict"], predictions, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        report["loss_value"], to_numpy(model.loss(Y[:64], predictions)), rtol=1e-5
    )
    hidden = keras.Model(model.input, model.get_layer("hidden").output)(X[:64])
    expected_penalty = to_numpy(model.get_layer("hidden").activity_regularizer.penalty(hidden))
    np.testing.assert_allclose(report["penalty"], expected_penalty, rtol=1e-5)
