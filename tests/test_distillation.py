"""LogitsDistillation: values, gradients, masks, Keras's loss API and keras.distillation.

The autodiff modes are in test_autodiff.py, where each `divergence` has its line.
"""

import inspect
import json

import keras
import numpy as np
import pytest
import reference as ref
from helpers import run_in_fresh_process, to_numpy, value_and_grad
from scipy.special import softmax
from sklearn.datasets import load_digits

import kl_keras

DIVERGENCES = ["kl", "reverse_kl", "jeffreys", "jensen_shannon"]
LOG_EPSILON = ref.LOG_EPSILON


def reference(teacher, student, temperature=1.0, divergence="kl", beta=0.5):
    """T² D(P ‖ Q) in float64, P and Q the softmaxes at temperature T, per row."""
    return ref.on_logits(divergence, teacher, student, temperature, beta)


def scaled_logits(rng, shape, temperature):
    # T * N(0, 1): softmax(. / T) is not nearly uniform, so a relative error measures the
    # computation, not only the cancellation of nearly equal numbers.
    return (temperature * rng.normal(size=shape)).astype("float32")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("vocabulary", [10, 32000])
def test_values_match_float64(divergence, temperature, vocabulary):
    rng = np.random.default_rng(vocabulary + int(temperature))
    teacher = scaled_logits(rng, (4, vocabulary), temperature)
    student = scaled_logits(rng, (4, vocabulary), temperature)
    loss = kl_keras.LogitsDistillation(temperature, divergence, beta=0.3, reduction="none")
    expected = reference(teacher, student, temperature, divergence, beta=0.3)
    np.testing.assert_allclose(to_numpy(loss(teacher, student)), expected, rtol=2e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_gradient_is_temperature_times_softmax_difference(temperature):
    rng = np.random.default_rng(1)
    teacher = scaled_logits(rng, (3, 32000), temperature)
    student = scaled_logits(rng, (3, 32000), temperature)
    loss = kl_keras.LogitsDistillation(temperature)  # sum_over_batch_size: mean of 3 rows
    _, (_, grad) = value_and_grad(loss, teacher, student)
    expected = (
        temperature
        * (softmax(np.float64(student) / temperature, -1) - softmax(teacher / temperature, -1))
        / 3
    )
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradients_match_float64_finite_differences(divergence):
    rng = np.random.default_rng(2)
    teacher, student = scaled_logits(rng, (2, 10), 2.0), scaled_logits(rng, (2, 10), 2.0)
    loss = kl_keras.LogitsDistillation(2.0, divergence, beta=0.3, reduction="sum")
    _, (grad_teacher, grad_student) = value_and_grad(loss, teacher, student)
    for argument, grad in ((0, grad_teacher), (1, grad_student)):
        expected = np.zeros((2, 10))
        for index in np.ndindex(2, 10):
            step = np.zeros((2, 10))
            step[index] = 1e-6
            args = [np.float64(teacher), np.float64(student)]
            plus, minus = list(args), list(args)
            plus[argument] = args[argument] + step
            minus[argument] = args[argument] - step
            expected[index] = (
                reference(*plus, 2.0, divergence, 0.3).sum()
                - reference(*minus, 2.0, divergence, 0.3).sum()
            ) / 2e-6
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6, err_msg=str(argument))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_masked_teacher_logits(divergence):
    # -inf teacher logits (a masked vocabulary): finite values and gradients; exact for
    # "kl" and "jensen_shannon", the log(epsilon) floor for the two that would be infinite.
    teacher = np.array([[3.0, -np.inf, 0.5, -np.inf], [-np.inf, 1.0, 2.0, 0.0]], "float32")
    student = np.array([[1.0, 0.2, -0.3, 2.0], [0.5, -1.0, 0.0, 1.5]], "float32")
    loss = kl_keras.LogitsDistillation(2.0, divergence, reduction="none")
    value, (_, grad) = value_and_grad(lambda t, s: loss(t, s), teacher, student)
    np.testing.assert_allclose(
        to_numpy(loss(teacher, student)), reference(teacher, student, 2.0, divergence), rtol=2e-6
    )
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # The reference floors nothing for "kl" and "jensen_shannon": there it is the exact value.


def test_masked_on_both_sides_contributes_exactly_zero():
    teacher = np.array([[1.0, -np.inf, 0.0]], "float32")
    student = np.array([[0.5, -np.inf, 0.3]], "float32")
    for divergence in DIVERGENCES:
        loss = kl_keras.LogitsDistillation(3.0, divergence, reduction="none")
        value, (_, grad) = value_and_grad(lambda t, s, loss=loss: loss(t, s), teacher, student)
        expected = reference(teacher[:, [0, 2]], student[:, [0, 2]], 3.0, divergence)
        np.testing.assert_allclose(value, expected.sum(), rtol=1e-5, atol=1e-6, err_msg=divergence)
        assert np.all(np.isfinite(grad)) and grad[0, 1] == 0.0, divergence


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_stay_finite(divergence):
    teacher = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4]], "float32")
    student = np.array([[-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]], "float32")
    loss = kl_keras.LogitsDistillation(1.0, divergence)
    value, grads = value_and_grad(loss, teacher, student)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads)


def test_nan_logits_give_nan_value_and_gradients():
    teacher = np.array([[1.0, np.nan, 0.0], [1.0, 2.0, 0.0]], "float32")
    student = np.array([[0.5, 0.1, 0.3], [0.2, 0.1, 0.0]], "float32")
    for divergence in DIVERGENCES:
        loss = kl_keras.LogitsDistillation(2.0, divergence, reduction="none")
        values = to_numpy(loss(teacher, student))
        assert np.isnan(values[0]) and np.isfinite(values[1]), divergence
        _, (_, grad) = value_and_grad(lambda t, s, loss=loss: loss(t, s), teacher, student)
        assert np.all(np.isnan(grad[0])) and np.all(np.isfinite(grad[1])), divergence


def test_jensen_shannon_beta_ends_are_forward_and_reverse():
    rng = np.random.default_rng(3)
    teacher, student = scaled_logits(rng, (3, 7), 2.0), scaled_logits(rng, (3, 7), 2.0)
    js = kl_keras.LogitsDistillation
    for beta, other in ((0.0, "kl"), (1.0, "reverse_kl")):
        np.testing.assert_array_equal(
            to_numpy(js(2.0, "jensen_shannon", beta=beta)(teacher, student)),
            to_numpy(js(2.0, other)(teacher, student)),
        )


def test_sample_weights_per_token_weight_out_padding():
    rng = np.random.default_rng(4)
    teacher, student = scaled_logits(rng, (2, 5, 11), 1.0), scaled_logits(rng, (2, 5, 11), 1.0)
    padding = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], "float32")
    loss = kl_keras.LogitsDistillation(2.0, reduction="sum")
    per_token = reference(teacher, student, 2.0)
    np.testing.assert_allclose(
        to_numpy(loss(teacher, student, sample_weight=padding)),
        (per_token * padding).sum(),
        rtol=2e-6,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"temperature": 0.0}, ValueError, "temperature=0.0"),
        ({"temperature": -1.0}, ValueError, "temperature=-1.0"),
        ({"temperature": float("inf")}, ValueError, "temperature=inf"),
        ({"temperature": float("nan")}, ValueError, "temperature=nan"),
        ({"temperature": "4"}, TypeError, "temperature='4'"),
        ({"temperature": True}, TypeError, "temperature=True"),
        ({"divergence": "js"}, ValueError, "'kl', 'reverse_kl', 'jeffreys', 'jensen_shannon'"),
        ({"beta": 1.5}, ValueError, "beta=1.5"),
        ({"beta": float("nan")}, ValueError, "beta=nan"),
        ({"axis": 1.0}, TypeError, "axis=1.0"),
    ],
)
def test_invalid_arguments_are_refused_when_built(kwargs, error, match):
    with pytest.raises(error, match=match.replace("(", r"\(").replace("[", r"\[")):
        kl_keras.LogitsDistillation(**kwargs)


def test_config_round_trip_and_registered_name():
    loss = kl_keras.LogitsDistillation(4.0, "jensen_shannon", 0.25, -1, "sum", "distill")
    config = loss.get_config()
    assert config["temperature"] == 4.0 and config["divergence"] == "jensen_shannon"
    assert config["beta"] == 0.25 and config["reduction"] == "sum" and config["name"] == "distill"
    arguments = set(inspect.signature(kl_keras.LogitsDistillation.__init__).parameters)
    assert arguments - {"self"} == set(config)
    rebuilt = kl_keras.LogitsDistillation.from_config(config)
    assert rebuilt.get_config() == config
    assert keras.saving.get_registered_name(kl_keras.LogitsDistillation) == (
        "kl_keras>LogitsDistillation"
    )
    assert isinstance(loss, keras.losses.Loss)
    assert isinstance(loss, keras.distillation.DistillationLoss)


def digits():
    data = load_digits()
    x = (data.data[:192] / 16.0).astype("float32")
    return x, data.target[:192].astype("int32")


def models(seed=0):
    keras.utils.set_random_seed(seed)
    teacher = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)],
        name="teacher",
    )
    student = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)], name="student")
    return teacher, student


def test_compile_and_distiller_train_the_same_student():
    # The same loss, data, batches and initial weights: `student.fit(x, teacher(x))` with the
    # loss in compile, and `Distiller` with it as its only loss, take the same steps.
    x, y = digits()
    teacher, student = models()
    teacher_logits = to_numpy(teacher(x))
    initial = student.get_weights()
    distillation = kl_keras.LogitsDistillation(temperature=4.0, divergence="jensen_shannon")

    student.compile(keras.optimizers.SGD(0.1), loss=distillation)
    compiled = student.fit(x, teacher_logits, batch_size=64, shuffle=False, epochs=2, verbose=0)
    compiled_weights = student.get_weights()

    student.set_weights(initial)
    distiller = keras.distillation.Distiller(
        teacher, student, distillation_losses=distillation, student_loss_weight=0.0
    )
    distiller.compile(keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    distilled = distiller.fit(x, y, batch_size=64, shuffle=False, epochs=2, verbose=0)

    np.testing.assert_allclose(
        distilled.history["distillation_loss"], compiled.history["loss"], rtol=1e-5
    )
    for a, b in zip(student.get_weights(), compiled_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_distiller_loss_is_finite_where_kl_keras_0_1_gave_nan():
    # 0.1's KLDivergence inside keras.distillation.LogitsDistillation read the teacher's
    # logits as probabilities: NaN. LogitsDistillation is the exact T² KL instead.
    x, y = digits()
    teacher, student = models()
    distiller = keras.distillation.Distiller(
        teacher, student, distillation_losses=kl_keras.LogitsDistillation(temperature=4.0)
    )
    distiller.compile(keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    history = distiller.fit(x, y, batch_size=64, epochs=2, verbose=0)
    losses = history.history["distillation_loss"]
    assert np.all(np.isfinite(losses))
    expected = reference(to_numpy(teacher(x)), to_numpy(student(x)), 4.0).mean()
    np.testing.assert_allclose(
        to_numpy(kl_keras.LogitsDistillation(temperature=4.0)(teacher(x), student(x))),
        expected,
        rtol=1e-5,
    )


LOAD_DISTILLER = """
    import json
    import numpy as np
    import keras
    import kl_keras

    data = np.load("data.npz")
    distiller = keras.models.load_model("distiller.keras")
    student = keras.models.load_model("student.keras")
    losses = distiller.distillation_losses
    report = {
        "distillation_configs": [loss.get_config() for loss in losses],
        "distillation_types": [type(loss).__name__ for loss in losses],
        "distiller_predict": distiller.predict(data["x"], verbose=0).tolist(),
        "student_loss": keras.saving.serialize_keras_object(student.loss),
        "student_evaluate": student.evaluate(data["x"], data["t"], verbose=0),
    }
    # Keras's Distiller overrides compile() and is loaded uncompiled (Keras warns): compile
    # it again to go on training. Its distillation losses are restored with it.
    distiller.compile(keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    history = distiller.fit(data["x"], data["y"], epochs=1, verbose=0)
    report["distiller_fit"] = history.history["distillation_loss"]
    with open("report.json", "w") as f:
        json.dump(report, f)
"""


@pytest.mark.slow
def test_distiller_and_compiled_student_load_in_a_fresh_process(tmp_path):
    x, y = digits()
    teacher, student = models()
    distillation = kl_keras.LogitsDistillation(3.0, "reverse_kl", name="rkl")
    distiller = keras.distillation.Distiller(teacher, student, distillation_losses=distillation)
    distiller.compile(keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    distiller.fit(x, y, epochs=1, verbose=0)
    distiller.save(tmp_path / "distiller.keras")
    teacher_logits = to_numpy(teacher(x))
    student.compile(keras.optimizers.Adam(1e-2), loss=distillation)
    student.save(tmp_path / "student.keras")
    np.savez(tmp_path / "data.npz", x=x, y=y, t=teacher_logits)

    run_in_fresh_process(LOAD_DISTILLER, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["distillation_types"] == ["LogitsDistillation"]
    assert report["distillation_configs"] == [distillation.get_config()]
    np.testing.assert_allclose(
        report["distiller_predict"], to_numpy(distiller.predict(x, verbose=0)), rtol=1e-5, atol=1e-6
    )
    assert report["student_loss"]["config"] == distillation.get_config()
    np.testing.assert_allclose(
        report["student_evaluate"], student.evaluate(x, teacher_logits, verbose=0), rtol=1e-5
    )
    assert np.all(np.isfinite(report["distiller_fit"]))
