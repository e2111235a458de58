"""Compile, fit, save, and load back in a fresh Python process with no custom_objects."""

import json

import keras
import numpy as np
import pytest
from helpers import run_in_fresh_process, to_numpy
from scipy.special import softmax
from sklearn.datasets import load_digits

import kl_keras

# Runs in the child: load with nothing but `import kl_keras`, report configs and numbers,
# then check that training goes on.
LOAD_AND_REPORT = """
    import json
    import numpy as np
    import keras
    import kl_keras

    def load_and_report(path, data):
        model = keras.models.load_model(path)
        regularized = [layer for layer in model.layers if layer.activity_regularizer is not None]
        report = {{
            "loss": keras.saving.serialize_keras_object(model.loss),
            "regularizers": [
                keras.saving.serialize_keras_object(layer.activity_regularizer)
                for layer in regularized
            ],
            "predict": model.predict(data["x"], verbose=0).tolist(),
            "evaluate": model.evaluate(data["x"], data["y"], verbose=0, return_dict=True),
        }}
        if path.endswith(".h5"):
            # Keras 3 restores a legacy .h5 optimizer that is bound to other variables and
            # cannot step (a plain Dense model fails the same way), so training goes on
            # with a fresh optimizer and the loss that was loaded.
            model.compile(keras.optimizers.Adam(1e-2), loss=model.loss)
        before = [w.copy() for w in model.get_weights()]
        history = model.fit(data["x"], data["y"], sample_weight=data["w"], epochs=2, verbose=0)
        report["fit_losses"] = history.history["loss"]
        report["weights_changed"] = any(
            not np.array_equal(a, b) for a, b in zip(before, model.get_weights())
        )
        return report

    data = np.load("data.npz")
    reports = {{path: load_and_report(path, data) for path in {paths}}}
    with open("report.json", "w") as f:
        json.dump(reports, f)
"""


def digits_with_soft_labels():
    """Digits images and a teacher's soft labels (temperature-scaled one-hots)."""
    digits = load_digits()
    x = (digits.data[:256] / 16.0).astype("float32")
    teacher_logits = 4.0 * np.eye(10)[digits.target[:256]]
    y = softmax(teacher_logits, axis=-1).astype("float32")
    w = np.random.default_rng(0).uniform(0.5, 1.5, size=256).astype("float32")
    return x, y, w


def build_model(loss, activation):
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(
        16,
        activation="sigmoid",
        activity_regularizer=kl_keras.KLActivityRegularizer(rho=0.1, beta=0.2),
    )(inputs)
    outputs = keras.layers.Dense(10, activation=activation)(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(
        keras.optimizers.Adam(1e-2),
        loss=loss,
        metrics=[
            kl_keras.KLDivergence(from_logits=activation is None, name="kl"),
            kl_keras.metrics.ReverseKLDivergence(from_logits=activation is None, name="rkl"),
            kl_keras.metrics.JensenShannonDivergence(
                beta=0.25, from_logits=activation is None, name="js"
            ),
        ],
    )
    return model


CASES = {
    "logits": (lambda: kl_keras.KLDivergence(from_logits=True, reduction="sum"), None),
    "probabilities": (lambda: kl_keras.KLDivergence(), "softmax"),
    "kld-function": (lambda: kl_keras.kld, "softmax"),
    "jensen-shannon-logits": (
        lambda: kl_keras.JensenShannonDivergence(beta=0.25, from_logits=True, name="js_loss"),
        None,
    ),
    "jeffreys-probabilities": (lambda: kl_keras.JeffreysDivergence(reduction="sum"), "softmax"),
}


@pytest.mark.parametrize("extension", ["keras", "h5"])
def test_saved_models_round_trip_in_a_fresh_process(tmp_path, extension):
    # Every case is saved here and loaded in one fresh process (one start-up, not five).
    x, y, w = digits_with_soft_labels()
    np.savez(tmp_path / "data.npz", x=x, y=y, w=w)
    models = {}
    for case in sorted(CASES):
        make_loss, activation = CASES[case]
        model = build_model(make_loss(), activation)
        history = model.fit(x, y, sample_weight=w, batch_size=32, epochs=2, verbose=0)
        assert history.history["loss"][-1] < history.history["loss"][0], case
        models[f"{case}.{extension}"] = model
        model.save(tmp_path / f"{case}.{extension}")

    run_in_fresh_process(LOAD_AND_REPORT.format(paths=sorted(models)), cwd=tmp_path)
    reports = json.loads((tmp_path / "report.json").read_text())

    assert set(reports) == set(models)
    for path, model in models.items():
        report = reports[path]
        assert report["loss"] == keras.saving.serialize_keras_object(model.loss), path
        assert report["regularizers"] == [
            keras.saving.serialize_keras_object(kl_keras.KLActivityRegularizer(rho=0.1, beta=0.2))
        ], path
        np.testing.assert_allclose(
            report["predict"],
            to_numpy(model.predict(x, verbose=0)),
            rtol=1e-5,
            atol=1e-6,
            err_msg=path,
        )
        expected = model.evaluate(x, y, verbose=0, return_dict=True)
        assert set(report["evaluate"]) == set(expected), path
        for name, value in expected.items():
            np.testing.assert_allclose(report["evaluate"][name], value, rtol=1e-4, err_msg=path)
        assert np.all(np.isfinite(report["fit_losses"])) and report["weights_changed"], path


def test_loss_used_as_metric_equals_the_loss():
    x, y, _ = digits_with_soft_labels()
    model = build_model(kl_keras.KLDivergence(from_logits=True), None)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    direct = to_numpy(kl_keras.KLDivergence(from_logits=True)(y, model.predict(x, verbose=0)))
    np.testing.assert_allclose(result["kl"], direct, rtol=1e-4)
    # The loss adds the activity penalty (> 0 away from rho); the metric does not.
    assert result["loss"] > result["kl"]


def test_fit_with_keras_masking():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 5, 3)).astype("float32")
    x[:, 3:] = 0.0  # padded steps, masked out
    y = softmax(rng.normal(size=(64, 5, 4)), axis=-1).astype("float32")
    inputs = keras.Input((5, 3))
    masked = keras.layers.Masking(0.0)(inputs)
    outputs = keras.layers.TimeDistributed(keras.layers.Dense(4))(masked)
    model = keras.Model(inputs, outputs)
    model.compile("adam", kl_keras.KLDivergence(from_logits=True))
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # With a mask, sum_over_batch_size averages over the unmasked steps only.
    logits = to_numpy(model.predict(x, verbose=0))
    per_step = to_numpy(kl_keras.kld(y, logits, from_logits=True))
    expected = per_step[:, :3].mean()
    np.testing.assert_allclose(model.evaluate(x, y, verbose=0), expected, rtol=1e-4)
