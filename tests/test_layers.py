"""VariationalSampling: the sample, the added KL, free bits, schedules that reach the step."""

import inspect

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, PerStepLoss, to_numpy, value_and_grad

import kl_keras
from kl_keras import schedules
from kl_keras.divergence import sparsity_penalty
from kl_keras.regularizers import KERAS_DIVIDES_BY_BATCH_SIZE

RNG = np.random.default_rng(0)


def latents(batch, dim=3, scale=1.0):
    return (RNG.normal(scale=scale, size=(batch, dim)).astype("float32") for _ in range(2))


def added_loss(layer, inputs, training):
    layer(inputs, training=training)
    (loss,) = layer.losses
    return float(to_numpy(loss))


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("training", [True, False])
def test_adds_beta_times_the_batch_mean_kl(batch, training):
    mean, log_var = latents(batch)
    layer = kl_keras.VariationalSampling(beta=0.3)
    expected = 0.3 * np.mean(ref.gaussian_kl(mean, log_var))
    np.testing.assert_allclose(added_loss(layer, [mean, log_var], training), expected, rtol=1e-5)


def test_learned_prior():
    mean, log_var = latents(9, dim=4)
    prior_mean, prior_log_var = latents(9, dim=4)
    layer = kl_keras.VariationalSampling(beta=2.0)
    value = added_loss(layer, [mean, log_var, prior_mean, prior_log_var], training=True)
    expected = 2.0 * np.mean(ref.gaussian_kl(mean, log_var, prior_mean, prior_log_var))
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_training_samples_with_the_reparameterisation_trick():
    mean = np.tile(np.array([[1.5, -2.0, 0.0]], "float32"), (20000, 1))
    log_var = np.tile(np.array([[0.0, 2.0, -3.0]], "float32"), (20000, 1))
    z = to_numpy(kl_keras.VariationalSampling(seed=3)([mean, log_var], training=True))
    noise = (z - mean) / np.exp(log_var / 2)
    np.testing.assert_allclose(noise.mean(0), 0.0, atol=0.03)  # 4 standard errors
    np.testing.assert_allclose(noise.std(0), 1.0, atol=0.03)
    assert abs(np.corrcoef(noise.T)[0, 1]) < 0.03
    # The gradient is the reparameterised one: dz/dmean = 1, dz/dlog_var = (z - mean) / 2.
    seeded = kl_keras.VariationalSampling(seed=3)
    _, (g_mean, g_log_var) = value_and_grad(
        lambda m, lv: seeded([m, lv], training=True), mean[:5], log_var[:5]
    )
    again = to_numpy(kl_keras.VariationalSampling(seed=3)([mean[:5], log_var[:5]], training=True))
    np.testing.assert_allclose(g_mean, 1.0)
    np.testing.assert_allclose(g_log_var, (again - mean[:5]) / 2, rtol=1e-5, atol=1e-6)


def test_same_seed_same_noise_and_noise_changes_per_call():
    mean, log_var = latents(4)
    first = kl_keras.VariationalSampling(seed=11)
    second = kl_keras.VariationalSampling(seed=11)
    a, b = (to_numpy(layer([mean, log_var], training=True)) for layer in (first, second))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, to_numpy(first([mean, log_var], training=True)))


def test_not_training_returns_the_mean_and_still_adds_the_kl():
    mean, log_var = latents(5)
    layer = kl_keras.VariationalSampling(beta=0.7)
    z = to_numpy(layer([mean, log_var], training=False))
    np.testing.assert_array_equal(z, mean)
    np.testing.assert_allclose(
        float(to_numpy(layer.losses[0])), 0.7 * np.mean(ref.gaussian_kl(mean, log_var)), rtol=1e-5
    )


def test_val_loss_measures_what_loss_measures():
    # With a learning rate of 0 the weights stay put: the KL (deterministic) of the
    # training steps and of validation must be the same number.
    x = RNG.normal(size=(32, 5)).astype("float32")
    inputs = keras.Input((5,))
    mean = keras.layers.Dense(2)(inputs)
    log_var = keras.layers.Dense(2)(inputs)
    z = kl_keras.VariationalSampling(beta=0.5)([mean, log_var])
    model = keras.Model(inputs, z)
    model.compile(keras.optimizers.SGD(0.0))
    history = model.fit(x, batch_size=8, epochs=1, validation_data=(x,), verbose=0).history
    assert history["loss"][0] > 0
    np.testing.assert_allclose(history["val_loss"], history["loss"], rtol=1e-5)


# ---------------------------------------------------------------- free bits


def test_free_bits_floor_each_dimension_and_stop_its_gradient():
    # Dimension 0 has a large KL, dimension 1 a tiny one, dimension 2 sits between.
    mean = np.array([[2.0, 0.01, 0.5], [1.5, -0.02, 0.6]], "float32")
    log_var = np.array([[-1.0, 0.01, 0.1], [-1.2, -0.01, -0.1]], "float32")
    free_bits = 0.1
    per_dimension = np.mean(ref.gaussian_kl(mean[..., None], log_var[..., None]), axis=0)
    assert per_dimension[0] > free_bits > per_dimension[1] and per_dimension[2] > free_bits

    def loss(m, lv):
        layer = kl_keras.VariationalSampling(beta=1.5, free_bits=free_bits)
        layer([m, lv], training=True)
        return layer.losses[0]

    value, (g_mean, g_log_var) = value_and_grad(loss, mean, log_var)
    np.testing.assert_allclose(value, 1.5 * np.maximum(per_dimension, free_bits).sum(), rtol=1e-5)
    _, (plain_mean, plain_log_var) = value_and_grad(
        lambda m, lv: 1.5 * kl_keras.gaussian_kl_divergence(m, lv) / 2, mean, log_var
    )
    np.testing.assert_array_equal(g_mean[:, 1], 0.0)
    np.testing.assert_array_equal(g_log_var[:, 1], 0.0)
    np.testing.assert_allclose(g_mean[:, [0, 2]], plain_mean[:, [0, 2]], rtol=1e-5)
    np.testing.assert_allclose(g_log_var[:, [0, 2]], plain_log_var[:, [0, 2]], rtol=1e-5)


def test_free_bits_keep_nan():
    mean, log_var = latents(3)
    mean[0, 0] = np.nan
    layer = kl_keras.VariationalSampling(free_bits=100.0)
    assert np.isnan(added_loss(layer, [mean, log_var], training=True))


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_stays_finite(policy):
    keras.config.set_dtype_policy(policy)
    mean = np.array([[0.5, -3.0, 1.0], [2.0, 0.0, 0.1]], "float32")
    log_var = np.array([[30.0, -30.0, 10.0], [-10.0, 1e-3, 0.0]], "float32")
    layer = kl_keras.VariationalSampling()
    half = layer.compute_dtype
    cast = [keras.ops.cast(x, half) for x in (mean, log_var)]
    value = added_loss(layer, cast, training=False)
    rounded = [to_numpy(keras.ops.cast(x, "float32")) for x in cast]
    np.testing.assert_allclose(value, np.mean(ref.gaussian_kl(*rounded)), rtol=1e-5)
    # Gradients through the half-precision inputs: finite up to lv = +10 in float16
    # (1/2 e^30 is beyond its range); bfloat16 holds ±30.
    if half == "float16":
        log_var = np.minimum(log_var, 10.0)

    def loss(m, lv):
        inner = kl_keras.VariationalSampling()
        z = inner([keras.ops.cast(m, half), keras.ops.cast(lv, half)], training=True)
        return inner.losses[0] + keras.ops.cast(keras.ops.sum(z), "float32")

    value, grads = value_and_grad(loss, mean, log_var)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert layer([*cast], training=True).dtype == cast[0].dtype


# ---------------------------------------------------------------- schedules reach the step


class OwnedBeta(keras.regularizers.Regularizer):
    """The trap: a β held by a regularizer (not a layer), set by a callback.

    Its penalty is β itself (times the batch size where Keras divides by it).
    """

    def __init__(self):
        self.beta = keras.Variable(0.0, trainable=False, name="owned_beta")

    def __call__(self, x):
        scale = (
            keras.ops.cast(keras.ops.shape(x)[0], "float32") if KERAS_DIVIDES_BY_BATCH_SIZE else 1.0
        )
        return self.beta * scale + 0.0 * keras.ops.sum(x)


class AssignEachStep(keras.callbacks.Callback):
    def __init__(self, variable, schedule):
        super().__init__()
        self.variable, self.schedule, self.step = variable, schedule, 0

    def on_train_batch_begin(self, batch, logs=None):
        self.variable.assign(float(to_numpy(self.schedule(self.step))))
        self.step += 1


def beta_reaching_each_step(schedule, jit_compile, owner="layer", epochs=3, steps=4):
    """The β of every training step, read back from the loss that reached the step.

    The model's only loss is its layer's KL (or the regularizer's penalty), the
    weights stay put (learning rate 0) and every batch holds the same rows, so the
    loss of each step is β times a constant that a β = 1 evaluation measures.
    """
    x = np.tile(RNG.normal(size=(8, 4)).astype("float32"), (steps, 1))
    keras.utils.set_random_seed(1)
    inputs = keras.Input((4,))
    callbacks = [PerStepLoss()]
    if owner == "layer":
        mean = keras.layers.Dense(3)(inputs)
        log_var = keras.layers.Dense(3)(inputs)
        outputs = kl_keras.VariationalSampling(beta=schedule, name="z")([mean, log_var])
    elif owner == "sparsity":
        hidden = keras.layers.Dense(5, activation="sigmoid")(inputs)
        outputs = kl_keras.KLActivityRegularization(0.1, schedule, name="sparsity")(hidden)
    else:
        regularizer = OwnedBeta()
        outputs = keras.layers.Dense(3, activity_regularizer=regularizer)(inputs)
        callbacks.append(AssignEachStep(regularizer.beta, schedule))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.0), jit_compile=jit_compile)
    if owner == "layer":
        encoder = keras.Model(inputs, model.get_layer("z").input)
        mean, log_var = (to_numpy(t) for t in encoder(x[:8]))
        constant = np.mean(ref.gaussian_kl(mean, log_var))
    elif owner == "sparsity":
        encoder = keras.Model(inputs, model.get_layer("sparsity").input)
        constant = float(to_numpy(sparsity_penalty(encoder(x[:8]), 0.1)[0]))
    else:
        constant = 1.0
    model.fit(x, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return np.array(callbacks[0].losses) / constant


def expected_betas(schedule, count):
    return np.array([float(to_numpy(schedule(step))) for step in range(count)])


JIT_MODES = {"tensorflow": [False, True], "jax": [False, True], "torch": [False]}
SCHEDULES = {
    "LinearWarmup": lambda: schedules.LinearWarmup(warmup_steps=7, start=0.1, stop=1.3),
    "CyclicalAnnealing": lambda: schedules.CyclicalAnnealing(cycle_steps=5, ratio=0.6),
    "keras PiecewiseConstantDecay": lambda: keras.optimizers.schedules.PiecewiseConstantDecay(
        [3, 8], [0.2, 0.9, 0.4]
    ),
}


@pytest.mark.parametrize("jit_compile", JIT_MODES.get(BACKEND, [False]))
@pytest.mark.parametrize("owner", ["layer", "sparsity"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_reaches_every_training_step(name, owner, jit_compile):
    # 3 epochs of 4 steps: the sequence crosses epoch boundaries and cycle ends.
    # "layer": VariationalSampling; "sparsity": KLActivityRegularization.
    betas = beta_reaching_each_step(SCHEDULES[name](), jit_compile, owner)
    np.testing.assert_allclose(betas, expected_betas(SCHEDULES[name](), 12), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("jit_compile", JIT_MODES.get(BACKEND, [False]))
def test_a_regularizer_owned_beta_is_frozen_on_jax(jit_compile):
    # Why β lives in the layer: a keras.Variable held by a regularizer and assigned by
    # a callback reaches the step on TensorFlow and PyTorch, but JAX's compiled step
    # only sees the layers' variables, so there it stays at its value when traced.
    schedule = SCHEDULES["LinearWarmup"]()
    betas = beta_reaching_each_step(schedule, jit_compile, owner="regularizer")
    expected = expected_betas(schedule, 12)
    if BACKEND == "jax" and jit_compile:
        assert np.ptp(betas) < 1e-6 and not np.allclose(betas, expected, atol=1e-3)
    else:
        np.testing.assert_allclose(betas, expected, rtol=1e-4, atol=1e-6)


def test_step_and_beta_state():
    schedule = schedules.LinearWarmup(warmup_steps=4)
    layer = kl_keras.VariationalSampling(beta=schedule)
    mean, log_var = latents(2)
    layer([mean, log_var], training=False)  # builds; not a training call
    assert int(to_numpy(layer.step)) == 0 and float(to_numpy(layer.current_beta)) == 0.0
    for step in range(6):
        layer([mean, log_var], training=True)
        assert int(to_numpy(layer.step)) == step + 1
        np.testing.assert_allclose(to_numpy(layer.current_beta), min(step / 4, 1.0), rtol=1e-6)
    assert layer.non_trainable_weights == [layer.step, layer.current_beta, layer.statistics_state]
    assert layer.trainable_weights == []
    # A constant β keeps its value and the step still counts nothing it needs.
    constant = kl_keras.VariationalSampling(beta=0.25)
    constant([mean, log_var], training=True)
    assert float(to_numpy(constant.current_beta)) == 0.25


# ---------------------------------------------------------------- config and checks


@pytest.mark.parametrize(
    "beta", [0.5, schedules.CyclicalAnnealing(10, ratio=0.3)], ids=["float", "schedule"]
)
def test_config_round_trips(beta):
    layer = kl_keras.VariationalSampling(beta=beta, free_bits=0.2, seed=5, name="z")
    config = layer.get_config()
    assert {"beta", "free_bits", "seed", "name"} <= set(config)
    arguments = set(inspect.signature(kl_keras.VariationalSampling.__init__).parameters)
    assert arguments - {"self", "kwargs"} <= set(config)
    restored = kl_keras.VariationalSampling.from_config(config)
    assert restored.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "kl_keras>VariationalSampling"
    if not isinstance(beta, float):
        assert type(restored.beta) is type(beta)
        assert restored.beta.get_config() == beta.get_config()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"beta": -0.1}, ValueError, "beta=-0.1"),
        ({"beta": float("nan")}, ValueError, "beta=nan"),
        ({"beta": "warmup"}, TypeError, "beta='warmup'"),
        ({"beta": lambda step: step}, TypeError, "LearningRateSchedule"),
        ({"free_bits": -1.0}, ValueError, "free_bits=-1.0"),
        ({"free_bits": float("inf")}, ValueError, "free_bits=inf"),
        ({"seed": "x"}, ValueError, "seed"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        kl_keras.VariationalSampling(**kwargs)


@pytest.mark.parametrize(
    "shapes, match",
    [
        ([(4, 3)], "expects a list"),
        ([(4, 3)] * 3, "expects a list"),
        ([(4, 3), (4, 2)], "same shape"),
    ],
)
def test_invalid_inputs_are_refused(shapes, match):
    inputs = [keras.Input(shape[1:], batch_size=shape[0]) for shape in shapes]
    with pytest.raises(ValueError, match=match):
        kl_keras.VariationalSampling()(inputs if len(inputs) > 1 else inputs[0])


# ---------------------------------------------------------------- saving


def vae(beta, free_bits=0.0):
    """A small VAE on 8-pixel inputs, with a sparsity penalty on its encoder's hidden layer."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="sigmoid")(inputs)
    warmup = schedules.LinearWarmup(10, stop=0.1)
    hidden = kl_keras.KLActivityRegularization(0.2, warmup, name="sparsity")(hidden)
    mean = keras.layers.Dense(2, name="mean")(hidden)
    log_var = keras.layers.Dense(2, name="log_var")(hidden)
    z = kl_keras.VariationalSampling(beta, free_bits, seed=4, name="z")([mean, log_var])
    outputs = keras.layers.Dense(8)(keras.layers.Dense(16, activation="relu")(z))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), loss="mse")
    return model


LOAD_AND_RESUME = """
    import importlib.util, json
    import numpy as np
    import keras
    import kl_keras

    x = np.load("x.npy")
    model = keras.models.load_model("vae.keras")
    layer = model.get_layer("z")
    report = {
        "config": layer.get_config(),
        "sparsity_config": model.get_layer("sparsity").get_config(),
        "step": int(keras.ops.convert_to_numpy(layer.step)),
        "predict": model.predict(x, verbose=0).tolist(),
        "evaluate": model.evaluate(x, x, verbose=0),
    }
    if keras.backend.backend() != "SAVED_ON":
        # Keras restores the optimizer of a file saved on PyTorch as the PyTorch
        # backend's Adam class, which cannot step on TensorFlow (a plain Dense model
        # fails the same way): a fresh optimizer, the layer's state untouched.
        model.compile(keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, x, batch_size=8, epochs=1, verbose=0)  # 4 more steps
    report["step_after"] = int(keras.ops.convert_to_numpy(layer.step))
    report["beta_after"] = float(keras.ops.convert_to_numpy(layer.current_beta))
    sparsity = model.get_layer("sparsity")
    report["sparsity_after"] = [
        int(keras.ops.convert_to_numpy(sparsity.step)),
        float(keras.ops.convert_to_numpy(sparsity.current_beta)),
    ]
    print(json.dumps(report))
"""


def this_and_next_backend():
    """This backend and the next installed one (tensorflow -> jax -> torch -> tensorflow).

    Each backend's run of the suite saves on itself and loads on itself and on one
    other backend, so the three runs together cross every backend.
    """
    import importlib.util

    order = ["tensorflow", "jax", "torch"]
    installed = [b for b in order if importlib.util.find_spec(b)]
    after = order[order.index(BACKEND) + 1 :] + order[: order.index(BACKEND)]
    return [BACKEND] + [b for b in after if b in installed][:1]


@pytest.mark.slow
def test_saved_vae_resumes_its_schedule_in_a_fresh_process_across_backends(tmp_path):
    import json

    from helpers import run_in_fresh_process

    x = RNG.uniform(size=(32, 8)).astype("float32")
    schedule = schedules.CyclicalAnnealing(cycle_steps=7, ratio=0.5, stop=0.8)
    model = vae(schedule, free_bits=0.02)
    model.fit(x, x, batch_size=8, epochs=2, verbose=0)  # 8 steps
    model.save(tmp_path / "vae.keras")
    np.save(tmp_path / "x.npy", x)
    layer = model.get_layer("z")
    for backend in this_and_next_backend():
        code = LOAD_AND_RESUME.replace("SAVED_ON", BACKEND)
        output = run_in_fresh_process(code, cwd=tmp_path, backend=backend)
        report = json.loads(output.strip().splitlines()[-1])
        assert report["config"] == layer.get_config(), backend
        assert report["sparsity_config"] == model.get_layer("sparsity").get_config()
        assert report["step"] == 8, backend
        # Not training, the layer returns the mean: predictions and the loss are exact.
        np.testing.assert_allclose(
            report["predict"], to_numpy(model.predict(x, verbose=0)), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(report["evaluate"], model.evaluate(x, x, verbose=0), rtol=1e-5)
        # Training goes on from step 8: the steps 8..11 used β(8)..β(11).
        assert report["step_after"] == 12, backend
        np.testing.assert_allclose(report["beta_after"], to_numpy(schedule(11)), rtol=1e-6)
        assert report["sparsity_after"][0] == 12
        np.testing.assert_allclose(report["sparsity_after"][1], 0.1, rtol=1e-6)  # warmed up


# ---------------------------------------------------------------- KLActivityRegularization


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_sparsity_layer_adds_what_the_regularizer_adds(batch):
    # The same activations through a regularized Dense and through a Dense followed by
    # the layer: the terms in model.losses agree on every Keras version (3.12 and
    # 3.14+ differ in how they scale an activity regularizer's value).
    x = RNG.normal(size=(batch, 6)).astype("float32")
    dense = keras.layers.Dense(5, activation="sigmoid")
    regularized = keras.layers.Dense(
        5, activation="sigmoid", activity_regularizer=kl_keras.KLActivityRegularizer(0.1, 0.3)
    )
    dense.build((None, 6))
    regularized.build((None, 6))
    regularized.set_weights(dense.get_weights())
    layer = kl_keras.KLActivityRegularization(rho=0.1, beta=0.3)
    outputs = layer(dense(x))
    regularized(x)
    (expected,) = regularized.losses
    (value,) = layer.losses
    np.testing.assert_allclose(to_numpy(value), to_numpy(expected), rtol=1e-6)
    np.testing.assert_array_equal(to_numpy(outputs), to_numpy(dense(x)))


def test_sparsity_layer_keeps_masks_and_shapes():
    inputs = keras.Input((4, 3))
    masked = keras.layers.Masking(0.0)(inputs)
    outputs = kl_keras.KLActivityRegularization()(masked)
    assert tuple(outputs.shape) == (None, 4, 3)
    x = np.ones((2, 4, 3), "float32")
    x[:, 2:] = 0.0
    model = keras.Model(inputs, outputs)
    mask = model.layers[-1].compute_mask(x, keras.ops.any(x != 0, axis=-1))
    np.testing.assert_array_equal(to_numpy(mask), [[True, True, False, False]] * 2)


def test_sparsity_layer_leaves_masked_steps_out_of_rho_hat():
    # A padded sequence: the penalty is that of the real steps alone, whatever the padding
    # holds (here -1, which would pull rho_hat down if it were counted).
    inputs = keras.Input((5, 3))
    masked = keras.layers.Masking(-1.0)(inputs)
    layer = kl_keras.KLActivityRegularization(rho=0.1, beta=1.0)
    model = keras.Model(inputs, layer(masked))
    rng = np.random.default_rng(3)
    x = rng.uniform(0.0, 0.3, size=(4, 5, 3)).astype("float32")
    lengths = [5, 3, 2, 4]
    real = np.arange(5)[None, :] < np.array(lengths)[:, None]
    padded = np.where(real[..., None], x, -1.0).astype("float32")
    model(padded)
    expected = ref.sparsity_penalty(x[real], rho=0.1)
    np.testing.assert_allclose(to_numpy(model.losses[0]), expected, rtol=1e-5)
    # The statistics count the real steps too, and training reaches the same number.
    model.compile(optimizer="sgd", loss=None)
    value = model.evaluate(padded, verbose=0)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    layer(padded)  # unmasked: the padding (-1) is counted, a different penalty
    assert abs(float(to_numpy(layer.losses[-1])) - expected) > 1e-3


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rho": 0.0}, ValueError, "rho=0.0"),
        ({"rho": 1.0}, ValueError, "rho=1.0"),
        ({"rho": float("nan")}, ValueError, "rho=nan"),
        ({"beta": -1.0}, ValueError, "beta=-1.0"),
        ({"beta": "0.1"}, TypeError, "beta='0.1'"),
    ],
)
def test_sparsity_layer_refuses_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kl_keras.KLActivityRegularization(**kwargs)


@pytest.mark.parametrize(
    "beta", [0.5, schedules.LinearWarmup(10, stop=0.2)], ids=["float", "schedule"]
)
def test_sparsity_layer_config_round_trips(beta):
    layer = kl_keras.KLActivityRegularization(rho=0.2, beta=beta, name="sparsity")
    config = layer.get_config()
    arguments = set(inspect.signature(kl_keras.KLActivityRegularization.__init__).parameters)
    assert arguments - {"self", "kwargs"} <= set(config)
    assert kl_keras.KLActivityRegularization.from_config(config).get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "kl_keras>KLActivityRegularization"


def test_sparsity_layer_inside_a_custom_layer_adds_the_penalty_itself():
    # The direct call that a KLActivityRegularizer gets wrong on Keras >= 3.14 (it
    # returns penalty * batch_size for Keras to divide): a sublayer adds the penalty.
    class Encoder(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(5, activation="sigmoid")
            self.sparsity = kl_keras.KLActivityRegularization(rho=0.1, beta=0.3)

        def call(self, x):
            return self.sparsity(self.dense(x))

    x = RNG.normal(size=(64, 6)).astype("float32")
    encoder = Encoder()
    codes = encoder(x)
    (value,) = encoder.losses
    expected = kl_keras.KLActivityRegularizer(0.1, 0.3).penalty(codes)
    np.testing.assert_allclose(to_numpy(value), to_numpy(expected), rtol=1e-6)
