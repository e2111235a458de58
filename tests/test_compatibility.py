"""The compatibility promise: models saved by earlier kl_keras versions keep loading.

`tests/fixtures/` holds `.keras` files written by `make_fixtures.py` with kl_keras
0.1.0, 0.2 (the KL family and its metric twins) and 0.3.0 (sequence distillation, top-k,
policy KL); each must load on every backend, with the same configs and the same numbers, in
this and every later version.
Also: `model.export()` artifacts reload with `keras.layers.TFSMLayer` in a process where
kl_keras cannot be imported.
"""

import inspect
import json
import pathlib
import warnings

import keras
import numpy as np
import pytest
from helpers import BACKEND, run_in_fresh_process, to_numpy

import kl_keras  # registers the objects the fixtures name

ALL_FIXTURES = sorted(pathlib.Path(__file__).resolve().parent.joinpath("fixtures").glob("*.keras"))


def _with_key(key):
    return [p for p in ALL_FIXTURES if key in json.loads(p.with_suffix(".json").read_text())]


# Compiled models (a loss and a "hidden" layer's regularizer), Distillers, and models
# with kl_keras layers (their configs and state under "layers").
DISTILLERS = _with_key("distillation_losses")
LAYERS = _with_key("layers")
# 0.3: SequenceDistillers (each head form and mode) and models compiled with 0.3's losses.
SEQUENCE_DISTILLERS = _with_key("sequence_distiller")
COMPILED = _with_key("compiled_loss")
FIXTURES = [
    p for p in ALL_FIXTURES if p not in DISTILLERS + LAYERS + SEQUENCE_DISTILLERS + COMPILED
]


def test_there_are_fixtures():
    assert len(FIXTURES) >= 10 and len(DISTILLERS) >= 1 and len(LAYERS) >= 1
    versions = {json.loads(p.with_suffix(".json").read_text())["kl_keras"] for p in ALL_FIXTURES}
    assert {"0.1.0", "0.2.0.dev0", "0.2.0"} <= versions


def _saved_kl_keras_objects(expected):
    """`module.ClassName` of every kl_keras object a fixture's JSON says was saved."""
    configs = [expected.get("loss"), *expected.get("distillation_losses", [])]
    configs += [*expected.get("metrics", []), *expected.get("layers", {}).values()]
    return [
        f"{c['module']}.{c['class_name']}"
        for c in configs
        if c and c.get("module", "").startswith("kl_keras")
    ]


def test_the_0_2_set_saves_every_public_object():
    # Saved with the minimum Keras by 0.2.0 (and its development versions): every public
    # object that can be saved, each loss in at least two configurations.
    counts = {}
    layers = {}
    for path in ALL_FIXTURES:
        expected = json.loads(path.with_suffix(".json").read_text())
        if not expected["kl_keras"].startswith("0.2"):
            continue
        assert expected["keras"].startswith("3.12"), path.stem
        for name in _saved_kl_keras_objects(expected):
            counts[name] = counts.get(name, 0) + 1
        layers.update(expected.get("layers", {}))
    for name in kl_keras.metrics.__all__:  # the five losses, each with its metric twin
        assert counts.get(f"kl_keras.losses.{name}", 0) >= 2, name
        assert counts.get(f"kl_keras.metrics.{name}", 0) >= 1, name
    assert counts.get("kl_keras.distillation.LogitsDistillation", 0) >= 2
    assert DISTILLERS and all(
        json.loads(p.with_suffix(".json").read_text())["kl_keras"].startswith("0.2")
        for p in DISTILLERS
    )
    sampling = next(c for c in layers.values() if c["class_name"] == "VariationalSampling")
    assert sampling["config"]["free_bits"] > 0 and isinstance(sampling["config"]["beta"], dict)
    assert any(c["class_name"] == "KLActivityRegularization" for c in layers.values())


@pytest.mark.parametrize("path", DISTILLERS, ids=[p.stem for p in DISTILLERS])
def test_distiller_fixture_loads_with_its_distillation_losses(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    with warnings.catch_warnings():  # Keras: a Distiller's custom compile() is not restored
        warnings.filterwarnings("ignore", r"`compile\(\)` was not called", UserWarning)
        distiller = keras.models.load_model(path)
    losses = distiller.distillation_losses
    assert [keras.saving.serialize_keras_object(m) for m in losses] == expected[
        "distillation_losses"
    ]
    x = np.array(expected["x"], "float32")
    np.testing.assert_allclose(
        to_numpy(distiller.predict(x, verbose=0)), expected["predict"], rtol=1e-5, atol=1e-6
    )
    teacher, student = distiller.teacher(x), distiller.student(x)
    values = [float(to_numpy(loss(teacher, student))) for loss in losses]
    np.testing.assert_allclose(values, expected["loss_values"], rtol=1e-5, atol=1e-7)
    # Keras's Distiller is loaded uncompiled (its compile() is custom): compile, train on.
    distiller.compile(
        keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    y = np.argmax(expected["teacher_predict"], axis=-1)
    history = distiller.fit(x, y, epochs=1, verbose=0).history["distillation_loss"]
    assert np.all(np.isfinite(history))


@pytest.mark.parametrize("path", LAYERS, ids=[p.stem for p in LAYERS])
def test_layer_fixture_loads_with_its_state_and_trains_on(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    model = keras.models.load_model(path)
    for name, serialized in expected["layers"].items():
        assert keras.saving.serialize_keras_object(model.get_layer(name)) == serialized
    layer = model.get_layer(expected.get("stateful_layer", "z"))
    assert int(to_numpy(layer.step)) == expected["step"]
    np.testing.assert_allclose(to_numpy(layer.current_beta), expected["current_beta"], rtol=1e-6)
    x = np.array(expected["x"], "float32")
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), expected["predict"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(model.evaluate(x, x, verbose=0), expected["evaluate"], rtol=1e-5)
    # Training continues the schedule from the saved step.
    model.fit(x, x, batch_size=len(x), epochs=2, verbose=0)
    assert int(to_numpy(layer.step)) == expected["step"] + 2
    np.testing.assert_allclose(
        to_numpy(layer.current_beta), to_numpy(layer.beta(expected["step"] + 1)), rtol=1e-6
    )


def test_the_0_3_set_saves_every_new_saveable_object():
    # Saved with the minimum Keras by 0.3.0: SequenceDistiller with Dense heads, padded
    # vocabularies (callable heads) and without a teacher, TopKDistillation in both tails,
    # PolicyKL. (AdaptiveKLController's β is a variable of the user's own model.)
    saved = [json.loads(p.with_suffix(".json").read_text()) for p in SEQUENCE_DISTILLERS]
    assert all(e["keras"].startswith("3.12") and e["kl_keras"] == "0.3.0" for e in saved)
    configs = [e["sequence_distiller"] for e in saved]
    assert any(c["vocabulary_size"] for c in configs)
    assert {e["has_teacher"] for e in saved} == {True, False}
    losses = [json.loads(p.with_suffix(".json").read_text())["compiled_loss"] for p in COMPILED]
    tails = {c["config"]["tail"] for c in losses if c["class_name"] == "TopKDistillation"}
    assert tails == {"bucket", "renormalize"}
    assert any(c["class_name"] == "PolicyKL" for c in losses)


@pytest.mark.parametrize("path", SEQUENCE_DISTILLERS, ids=[p.stem for p in SEQUENCE_DISTILLERS])
def test_sequence_distiller_fixture_loads_and_trains_on(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    distiller = keras.models.load_model(path)
    config = distiller.get_config()
    for key, value in expected["sequence_distiller"].items():
        assert config[key] == value, key
    assert (distiller.teacher is not None) == expected["has_teacher"]
    x, y = np.array(expected["x"], "int32"), np.array(expected["y"])
    weights = np.array(expected["sample_weight"], "float32")
    np.testing.assert_allclose(
        to_numpy(distiller.predict(x, verbose=0)), expected["hidden"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        to_numpy(distiller.student.predict(x, verbose=0)),
        expected["student_logits"],
        rtol=1e-5,
        atol=1e-6,
    )
    loss = float(to_numpy(distiller.compute_loss(x, y, None, weights, training=False)))
    np.testing.assert_allclose(loss, expected["loss_value"], rtol=1e-5, atol=1e-7)
    distiller.compile(keras.optimizers.Adam(1e-2))
    history = distiller.fit(x, y, sample_weight=weights, epochs=1, verbose=0).history
    assert np.all(np.isfinite(history["distillation_loss"]))


@pytest.mark.parametrize("path", COMPILED, ids=[p.stem for p in COMPILED])
def test_0_3_loss_fixture_loads_with_the_same_config_and_numbers(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    model = keras.models.load_model(path)
    assert keras.saving.serialize_keras_object(model.loss) == expected["compiled_loss"]
    x, y = np.array(expected["x"]), np.array(expected["y"], "float32")
    weights = np.array(expected["sample_weight"], "float32")
    predictions = to_numpy(model.predict(x, verbose=0))
    np.testing.assert_allclose(predictions, expected["predict"], rtol=1e-5, atol=1e-6)
    value = float(to_numpy(model.loss(y, predictions, sample_weight=weights)))
    np.testing.assert_allclose(value, expected["loss_value"], rtol=1e-5, atol=1e-7)
    history = model.fit(x, y, sample_weight=weights, epochs=1, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_fixture_loads_with_the_same_configs_and_numbers(path):
    expected = json.loads(path.with_suffix(".json").read_text())
    model = keras.models.load_model(path)
    regularizer = model.get_layer("hidden").activity_regularizer
    assert keras.saving.serialize_keras_object(model.loss) == expected["loss"]
    assert keras.saving.serialize_keras_object(regularizer) == expected["regularizer"]

    x = np.array(expected["x"], "float32")
    y = np.array(expected["y"], "float32")
    predictions = to_numpy(model.predict(x, verbose=0))
    np.testing.assert_allclose(predictions, expected["predict"], rtol=1e-5, atol=1e-6)
    loss_value = to_numpy(keras.ops.cast(model.loss(y, predictions), "float32"))
    low_precision = "bfloat16" in path.stem
    np.testing.assert_allclose(
        loss_value, expected["loss_value"], rtol=1e-2 if low_precision else 1e-5, atol=1e-6
    )
    hidden = keras.Model(model.input, model.get_layer("hidden").output)(x)
    np.testing.assert_allclose(
        float(to_numpy(regularizer.penalty(hidden))), expected["penalty"], rtol=1e-5, atol=1e-7
    )
    if "metrics" in expected:  # 0.2 on: the compiled metric twins come back too
        assert model.get_compile_config()["metrics"] == expected["metrics"]
        evaluated = model.evaluate(x, y, verbose=0, return_dict=True)
        for name, value in expected["metric_values"].items():
            np.testing.assert_allclose(evaluated[name], value, rtol=1e-5, atol=1e-7)
    # And it trains on.
    history = model.fit(x, y, epochs=1, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))


def configs_saved_by_0_1_0():
    """(class, config) of every loss and regularizer config that 0.1.0 wrote in a fixture."""
    found = {}
    for path in FIXTURES:
        expected = json.loads(path.with_suffix(".json").read_text())
        if expected["kl_keras"] != "0.1.0":
            continue
        for serialized in (expected["loss"], expected["regularizer"]):
            cls = keras.saving.get_registered_object(serialized["registered_name"])
            if inspect.isclass(cls):
                found[f"{path.stem}-{cls.__name__}"] = (cls, serialized["config"])
    return found


OLD_CONFIGS = configs_saved_by_0_1_0()


@pytest.mark.parametrize("name", sorted(OLD_CONFIGS))
def test_a_config_missing_any_key_loads_with_that_keys_default(name):
    # A release that adds a constructor argument must still load every file saved
    # before it, whose configs lack the new key: missing keys take their defaults.
    cls, config = OLD_CONFIGS[name]
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(cls.__init__).parameters.items()
        if key != "self"
    }
    assert set(config) <= set(defaults)
    for key in config:
        partial = {k: v for k, v in config.items() if k != key}
        rebuilt = cls.from_config(partial).get_config()
        assert rebuilt[key] == defaults[key], (key, rebuilt)
        for other in partial:
            assert rebuilt[other] == config[other], (other, rebuilt)
    # Unknown keys are still refused, naming the key.
    with pytest.raises(ValueError, match=r"unknown keys \['temperature'\]"):
        cls.from_config(dict(config, temperature=2.0))


def test_there_are_0_1_0_configs_of_both_classes():
    assert {cls.__name__ for cls, _ in OLD_CONFIGS.values()} == {
        "KLDivergence",
        "KLActivityRegularizer",
    }


RELOAD_WITHOUT_KL_KERAS = """
import sys

sys.modules["kl_keras"] = None  # any import of kl_keras now fails
import json
import numpy as np
import keras

layer = keras.layers.TFSMLayer("exported", call_endpoint="serve")
x = np.load("x.npy")
print(json.dumps(np.asarray(layer(x)).tolist()))
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND == "torch", reason="model.export() here is TF SavedModel: TF and JAX")
def test_exported_model_reloads_without_kl_keras(tmp_path):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(
        8,
        activation="sigmoid",
        activity_regularizer=kl_keras.KLActivityRegularizer(0.1, 0.5),
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(hidden))
    model.compile("adam", loss=kl_keras.KLDivergence(from_logits=True))
    x = np.random.default_rng(0).normal(size=(6, 5)).astype("float32")
    model.fit(x, np.full((6, 4), 0.25, "float32"), epochs=1, verbose=0)
    model.export(tmp_path / "exported", verbose=False)
    np.save(tmp_path / "x.npy", x)
    # TFSMLayer is a TensorFlow-backend layer, whichever backend exported the model.
    output = run_in_fresh_process(RELOAD_WITHOUT_KL_KERAS, cwd=tmp_path, backend="tensorflow")
    reloaded = np.array(json.loads(output.strip().splitlines()[-1]))
    np.testing.assert_allclose(
        reloaded, to_numpy(model.predict(x, verbose=0)), rtol=1e-5, atol=1e-6
    )
