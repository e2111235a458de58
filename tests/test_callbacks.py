"""KLMonitor: the statistics it logs equal numpy over the same activations, on every backend."""

import csv

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, to_numpy
from scipy.special import rel_entr

import kl_keras
from kl_keras import schedules

RNG = np.random.default_rng(0)
X = RNG.normal(size=(50, 6)).astype("float32")  # batches of 16: 16, 16, 16, 2
X_VAL = RNG.normal(size=(21, 6)).astype("float32")
JIT_MODES = {"tensorflow": [False, True], "jax": [False, True], "torch": [False]}


def frozen_model(jit_compile):
    """Both kinds of KL layer, with a learning rate of 0: every epoch sees the same activations."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="sigmoid", name="hidden")(inputs)
    code = kl_keras.KLActivityRegularization(0.1, schedules.LinearWarmup(4), name="code")(hidden)
    mean = keras.layers.Dense(4, name="mean")(code)
    log_var = keras.layers.Dense(4, name="log_var")(code)
    z = kl_keras.VariationalSampling(0.5, name="z")([mean, log_var])
    model = keras.Model(inputs, keras.layers.Dense(6)(z))
    model.compile(keras.optimizers.SGD(0.0), loss="mse", jit_compile=jit_compile)
    return model


def expected_logs(model, x, batch_size, beta, active_threshold):
    """The monitor's numbers, from numpy over the activations of `x`."""
    hidden = to_numpy(keras.Model(model.input, model.get_layer("hidden").output)(x))
    rho_hat = hidden.mean(0)
    batches = [hidden[i : i + batch_size] for i in range(0, len(x), batch_size)]
    penalties = [
        beta_k * np.sum(rel_entr(0.1, h.mean(0)) + rel_entr(0.9, 1 - h.mean(0)))
        for beta_k, h in zip(beta, batches, strict=True)
    ]
    encoder = keras.Model(model.input, model.get_layer("z").input)
    mean, log_var = (np.float64(to_numpy(t)) for t in encoder(x))
    kl = np.mean(ref.gaussian_kl(mean[..., None], log_var[..., None]), axis=0)
    return {
        "code_rho_hat": rho_hat.mean(),
        "code_rho_hat_min": rho_hat.min(),
        "code_rho_hat_max": rho_hat.max(),
        "code_dead_units": np.mean(rho_hat < 0.3),
        "code_penalty": np.mean(penalties),
        "z_kl": kl.sum(),
        "z_kl_min": kl.min(),
        "z_kl_max": kl.max(),
        "z_active_units": np.sum(mean.var(0) > active_threshold),
    }


@pytest.mark.parametrize("jit_compile", JIT_MODES.get(BACKEND, [False]))
def test_logged_statistics_equal_numpy(jit_compile, tmp_path):
    model = frozen_model(jit_compile)
    encoder = keras.Model(model.input, model.get_layer("z").input)
    variances = np.sort(np.var(to_numpy(encoder(X)[0]), axis=0))
    threshold = float(variances[1:3].mean())  # two of the four dimensions are active
    monitor = kl_keras.callbacks.KLMonitor(dead_threshold=0.3, active_threshold=threshold)
    csv_path = tmp_path / "log.csv"
    history = model.fit(
        X,
        X,
        batch_size=16,
        epochs=2,
        validation_data=(X_VAL, X_VAL),
        validation_batch_size=8,
        shuffle=False,  # the per-batch penalties depend on which rows share a batch
        callbacks=[monitor, keras.callbacks.CSVLogger(str(csv_path))],
        verbose=0,
    ).history
    # LinearWarmup(4): epoch 0 uses β(0..3), epoch 1 β(4..7); validation the latest.
    for epoch, betas in enumerate([[0.0, 0.25, 0.5, 0.75], [1.0] * 4]):
        expected = expected_logs(model, X, 16, betas, threshold)
        expected["code_beta"] = betas[-1]
        expected["z_beta"] = 0.5
        for key, value in expected.items():
            np.testing.assert_allclose(
                history[key][epoch], value, rtol=2e-5, atol=1e-7, err_msg=key
            )
        val_betas = [betas[-1]] * 3
        for key, value in expected_logs(model, X_VAL, 8, val_betas, threshold).items():
            np.testing.assert_allclose(
                history[f"val_{key}"][epoch], value, rtol=2e-5, atol=1e-7, err_msg=key
            )
    assert history["z_active_units"] == [2, 2]
    # The same numbers reach CSVLogger.
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    np.testing.assert_allclose(
        float(rows[1]["code_rho_hat"]), history["code_rho_hat"][1], rtol=1e-6
    )
    np.testing.assert_allclose(float(rows[1]["val_z_kl"]), history["val_z_kl"][1], rtol=1e-6)


def test_statistics_follow_training():
    # With a learning rate, the epoch's numbers move: a strong sparsity penalty drives
    # rho_hat toward rho from one epoch to the next.
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(16, activation="sigmoid", name="hidden")(inputs)
    outputs = keras.layers.Dense(6)(
        kl_keras.KLActivityRegularization(0.05, 2.0, name="code")(hidden)
    )
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.05), loss="mse")
    x = RNG.normal(size=(256, 6)).astype("float32")
    history = model.fit(x, x, epochs=6, callbacks=[kl_keras.callbacks.KLMonitor()], verbose=0)
    rho_hat = history.history["code_rho_hat"]
    assert abs(rho_hat[-1] - 0.05) < abs(rho_hat[0] - 0.05) / 2
    assert history.history["code_beta"] == [2.0] * 6


def test_a_regularizer_reports_its_beta_and_warns():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(
        4,
        activation="sigmoid",
        activity_regularizer=kl_keras.KLActivityRegularizer(0.1, 0.7),
        name="code",
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(6)(hidden))
    model.compile("adam", "mse")
    with pytest.warns(UserWarning, match=r"\['code'\] carry a KLActivityRegularizer"):
        history = model.fit(X, X, epochs=1, callbacks=[kl_keras.callbacks.KLMonitor()], verbose=0)
    assert history.history["code_beta"] == [0.7]
    assert "code_rho_hat" not in history.history


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dead_threshold": 1.0}, ValueError, "dead_threshold=1.0"),
        ({"dead_threshold": -0.1}, ValueError, "dead_threshold=-0.1"),
        ({"active_threshold": float("nan")}, ValueError, "active_threshold=nan"),
        ({"active_threshold": "0.01"}, TypeError, "active_threshold='0.01'"),
    ],
)
def test_invalid_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        kl_keras.callbacks.KLMonitor(**kwargs)


def test_a_regularizer_on_a_plain_dense_is_read_over_the_data_it_is_given():
    # The way the README's first example attaches the penalty: `activity_regularizer=` on a
    # Dense. The monitor reads the layer over `data` at each epoch end, with that epoch's
    # final weights; nothing is added to what the layer saves.
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    regularizer = kl_keras.KLActivityRegularizer(0.1, 0.7)
    code = keras.layers.Dense(
        4, activation="sigmoid", activity_regularizer=regularizer, name="code"
    )
    model = keras.Model(inputs, keras.layers.Dense(6)(code(inputs)))
    model.compile(keras.optimizers.Adam(0.05), "mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append(
            to_numpy(keras.Model(inputs, code.output)(X_VAL))
        )
    )
    monitor = kl_keras.callbacks.KLMonitor(data=X_VAL, batch_size=8, dead_threshold=0.2)
    history = model.fit(X, X, epochs=3, callbacks=[monitor, record], verbose=0)
    for epoch, activations in enumerate(seen):
        rho_hat = activations.mean(0)
        penalty = 0.7 * np.sum(rel_entr(0.1, rho_hat) + rel_entr(0.9, 1 - rho_hat))
        logged = {key: values[epoch] for key, values in history.history.items()}
        np.testing.assert_allclose(logged["code_rho_hat"], rho_hat.mean(), rtol=1e-5)
        np.testing.assert_allclose(logged["code_rho_hat_min"], rho_hat.min(), rtol=1e-5)
        np.testing.assert_allclose(logged["code_rho_hat_max"], rho_hat.max(), rtol=1e-5)
        assert logged["code_dead_units"] == np.mean(rho_hat < 0.2)
        np.testing.assert_allclose(logged["code_penalty"], penalty, rtol=1e-5)
        assert logged["code_beta"] == 0.7
    assert len(set(history.history["code_rho_hat"])) == 3  # it follows training
    assert len(model.get_layer("code").weights) == 2  # kernel and bias: nothing added


# ---------------------------------------------------------------- AdaptiveKLController


class PenalizedScalar(keras.Model):
    """One weight w; its "KL" is w², its loss β·w²: SGD multiplies w by 1 - 2·lr·β a step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.w = self.add_weight(shape=(), initializer=keras.initializers.Constant(1.0))
        self.kl_coefficient = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="kl_coefficient"
        )
        self.kl_tracker = keras.metrics.Mean(name="kl")

    def call(self, x):
        return keras.ops.multiply(x, self.w)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        kl = self.w * self.w
        self.kl_tracker.update_state(kl)
        return self.kl_coefficient * kl


def controlled_trajectory(epochs, steps, lr, target, horizon, initial, w=1.0):
    """Ziegler's controller and SGD on PenalizedScalar, in float64."""
    beta, betas, weights = initial, [], []
    for _ in range(epochs):
        kls = []
        for _ in range(steps):
            kls.append(w * w)
            w -= lr * 2 * beta * w
        beta *= 1 + np.clip(np.mean(kls) / target - 1, -0.2, 0.2) * steps / horizon
        betas.append(beta)
        weights.append(w)
    return betas, weights


@pytest.mark.parametrize("jit_compile", JIT_MODES.get(BACKEND, [False]))
def test_adaptive_kl_controller_reaches_the_compiled_step(jit_compile):
    # The KL (w²) stays above target, so β grows by 20% × 4 / 10 each epoch, and w
    # shrinks faster each epoch: only if the step sees the new β.
    model = PenalizedScalar()
    model.compile(keras.optimizers.SGD(0.05), jit_compile=jit_compile)
    controller = kl_keras.callbacks.AdaptiveKLController(target=0.1, horizon=10, initial=0.5)
    x = np.ones((16, 1), "float32")
    history = model.fit(x, epochs=5, batch_size=4, callbacks=[controller], verbose=0)
    betas, weights = controlled_trajectory(5, 4, 0.05, 0.1, 10, 0.5)
    np.testing.assert_allclose(history.history["kl_coefficient"], betas, rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(model.w)), weights[-1], rtol=1e-5)
    np.testing.assert_allclose(float(to_numpy(model.kl_coefficient)), betas[-1], rtol=1e-5)
    assert betas[-1] > 0.5 * 1.08**4  # β moved, and moved w
    # A later fit carries β on (initial applies to the first fit only).
    history = model.fit(x, epochs=1, batch_size=4, callbacks=[controller], verbose=0)
    again, _ = controlled_trajectory(1, 4, 0.05, 0.1, 10, betas[-1], weights[-1])
    np.testing.assert_allclose(history.history["kl_coefficient"], again, rtol=1e-5)


def test_adaptive_kl_controller_update_by_hand():
    model = PenalizedScalar()
    model.build((None, 1))
    controller = kl_keras.callbacks.AdaptiveKLController(target=2.0, horizon=100)
    controller.set_model(model)
    model.kl_coefficient.assign(0.3)
    assert controller.update(kl=1.0, steps=50) == pytest.approx(0.3 * (1 - 0.2 * 0.5))
    assert controller.update(kl=2.2, steps=10) == pytest.approx(0.27 * (1 + 0.1 * 0.1))


def test_adaptive_kl_controller_refuses_what_the_step_would_not_see():
    model = PenalizedScalar()
    model.compile("sgd")
    x = np.ones((4, 1), "float32")
    foreign = keras.Variable(0.1, trainable=False)  # held by the callback, not the model
    for coefficient, match in ((foreign, "non-trainable scalar"), ("beta", "non-trainable")):
        controller = kl_keras.callbacks.AdaptiveKLController(1.0, 10, coefficient=coefficient)
        with pytest.raises(ValueError, match=match):
            model.fit(x, epochs=1, callbacks=[controller], verbose=0)
    controller = kl_keras.callbacks.AdaptiveKLController(1.0, 10, kl_key="policy_kl")
    with pytest.raises(ValueError, match="no `policy_kl` in the logs.*'kl'"):
        model.fit(x, epochs=1, callbacks=[controller], verbose=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"target": 0.0, "horizon": 10}, ValueError, "target"),
        ({"target": 0.1, "horizon": float("inf")}, ValueError, "horizon"),
        ({"target": 0.1, "horizon": 10, "initial": -1.0}, ValueError, "initial"),
        ({"target": 0.1, "horizon": 10, "kl_key": 3}, TypeError, "kl_key"),
        ({"target": 0.1, "horizon": 10, "coefficient": 0.2}, TypeError, "coefficient"),
    ],
)
def test_adaptive_kl_controller_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        kl_keras.callbacks.AdaptiveKLController(**kwargs)
