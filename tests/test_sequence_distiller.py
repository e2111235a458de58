"""SequenceDistiller: plain Keras and KerasHub models, against their full logits; training,
the student's own loss, vocabularies, saving and loading in a fresh process."""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, run_in_fresh_process, to_numpy

import kl_keras
from kl_keras import SequenceDistiller

V, T = 23, 9


def language_model(width, seed, vocabulary=V):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, width)(tokens)
    x = keras.layers.Dense(width, activation="tanh")(x)
    return keras.Model(tokens, keras.layers.Dense(vocabulary)(x))


def data(seed=0, n=24):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(n, T)).astype("int32")
    lengths = rng.integers(2, T + 1, size=n)
    weights = (np.arange(T) < lengths[:, None]).astype("float32")  # right padding
    return x, np.roll(x, -1, axis=1), weights


def full_logits_loss(teacher_logits, student_logits, weights, name="kl", temperature=1.0):
    values = ref.on_logits(
        name, np.float64(teacher_logits), np.float64(student_logits), temperature, 0.5
    )
    return np.sum(values * weights) / np.sum(weights)


def cross_entropy(logits, labels, weights):
    log_q = ref.log_softmax(np.float64(logits))
    picked = np.take_along_axis(log_q, labels[..., None], -1)[..., 0]
    return -np.sum(picked * weights) / np.sum(weights)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jensen_shannon"])
def test_loss_equals_the_one_from_full_logits(name):
    teacher, student = language_model(16, 0), language_model(8, 1)
    distiller = SequenceDistiller(teacher, student, name, temperature=2.0, chunk_size=7)
    x, y, weights = data()
    loss = distiller.compute_loss(x, y, None, weights, training=False)
    expected = full_logits_loss(
        to_numpy(teacher(x)), to_numpy(student(x)), weights, name, temperature=2.0
    )
    np.testing.assert_allclose(float(to_numpy(loss)), expected, rtol=1e-5)


@pytest.mark.parametrize("built_by", ["list", "add"])
def test_sequential_models_split_at_their_last_dense_layer(built_by):
    def sequential(width, seed):
        keras.utils.set_random_seed(seed)
        layers = [
            keras.layers.Embedding(V, width),
            keras.layers.Dense(width, activation="tanh"),
            keras.layers.Dense(V),
        ]
        if built_by == "list":
            return keras.Sequential([keras.Input((T,), dtype="int32"), *layers])
        model = keras.Sequential([keras.Input((T,), dtype="int32")])
        for layer in layers:
            model.add(layer)
        return model

    teacher, student = sequential(16, 0), sequential(8, 1)
    distiller = SequenceDistiller(teacher, student, chunk_size=7)
    x, y, weights = data()
    loss = distiller.compute_loss(x, y, None, weights, training=False)
    expected = full_logits_loss(to_numpy(teacher(x)), to_numpy(student(x)), weights)
    np.testing.assert_allclose(float(to_numpy(loss)), expected, rtol=1e-5)


def test_fit_distills_the_student_and_leaves_the_teacher_alone():
    teacher, student = language_model(16, 0), language_model(8, 1)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    distiller = SequenceDistiller(teacher, student, chunk_size=16)
    distiller.compile(optimizer=keras.optimizers.Adam(0.05))
    x, y, weights = data()
    history = distiller.fit(x, y, sample_weight=weights, epochs=6, batch_size=8, verbose=0)
    losses = history.history["distillation_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert history.history["tokens"] == [float(np.sum(weights))] * 6
    for before, after in zip(teacher_weights, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    # the logged epoch mean is over the epoch's real tokens
    logs = distiller.evaluate(
        x, y, sample_weight=weights, batch_size=5, verbose=0, return_dict=True
    )
    expected = full_logits_loss(to_numpy(teacher(x)), to_numpy(student(x)), weights)
    np.testing.assert_allclose(logs["distillation_loss"], expected, rtol=1e-4)


@pytest.mark.parametrize("jit_compile", [False, True] if BACKEND != "torch" else [False])
def test_stored_and_recomputed_gradients_train_alike(jit_compile):
    # backward="stored" (each chunk's gradient kept from the forward pass) against the
    # rematerialised chunks, through fit's compiled step, the student's own loss included.
    x, y, weights = data(2)
    runs = {}
    for backward in ("recompute", "stored"):
        teacher, student = language_model(16, 0), language_model(8, 1)
        distiller = SequenceDistiller(
            teacher, student, chunk_size=7, student_loss_weight=0.2, backward=backward
        )
        distiller.compile(keras.optimizers.SGD(0.5), jit_compile=jit_compile)
        history = distiller.fit(x, y, sample_weight=weights, epochs=2, batch_size=8, verbose=0)
        runs[backward] = history.history, student.get_weights()
    (recompute, recompute_weights), (stored, stored_weights) = runs.values()
    np.testing.assert_allclose(stored["loss"], recompute["loss"], rtol=1e-5)
    for a, b in zip(stored_weights, recompute_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(stored_weights[-1] - language_model(8, 1).get_weights()[-1])) > 1e-3


def test_student_loss_weight_adds_the_students_cross_entropy():
    teacher, student = language_model(16, 2), language_model(8, 3)
    x, y, weights = data(1)
    distiller = SequenceDistiller(teacher, student, chunk_size=5, student_loss_weight=0.3)
    loss = float(to_numpy(distiller.compute_loss(x, y, None, weights, training=False)))
    student_logits = to_numpy(student(x))
    expected = full_logits_loss(to_numpy(teacher(x)), student_logits, weights)
    expected += 0.3 * cross_entropy(student_logits, y, weights)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_different_vocabularies_need_vocabulary_size():
    teacher, student = language_model(16, 0, vocabulary=V + 5), language_model(8, 1)
    with pytest.raises(ValueError, match=rf"teacher {V + 5}, student {V}"):
        SequenceDistiller(teacher, student)
    with pytest.raises(ValueError, match="vocabulary_size"):
        SequenceDistiller(teacher, student, vocabulary_size=V + 1)
    distiller = SequenceDistiller(teacher, student, vocabulary_size=V - 3, chunk_size=4)
    x, y, weights = data(2)
    loss = float(to_numpy(distiller.compute_loss(x, y, None, weights, training=False)))
    expected = full_logits_loss(
        to_numpy(teacher(x))[..., : V - 3], to_numpy(student(x))[..., : V - 3], weights
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_models_without_a_linear_dense_head_are_refused():
    tokens = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, 8)(tokens)
    softmax = keras.Model(tokens, keras.layers.Dense(V, activation="softmax")(x))
    with pytest.raises(ValueError, match="`student`.*Dense layer without activation"):
        SequenceDistiller(language_model(8, 0), softmax)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"student_loss_weight": -0.1}, "student_loss_weight"),
        ({"divergence": "binary_kl"}, "divergence"),
    ],
)
def test_bad_arguments_are_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SequenceDistiller(language_model(16, 0), language_model(8, 1), **kwargs)


@pytest.mark.slow
def test_saved_distiller_loads_in_a_fresh_process(tmp_path):
    teacher, student = language_model(16, 0), language_model(8, 1)
    distiller = SequenceDistiller(teacher, student, "jeffreys", temperature=3.0, chunk_size=6)
    distiller.compile(optimizer="adam")
    x, y, weights = data(3)
    distiller.fit(x, y, sample_weight=weights, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "distiller.keras"
    distiller.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", weights)
    expected = float(to_numpy(distiller.compute_loss(x, y, None, weights, training=False)))
    code = f"""
import keras, numpy as np
import kl_keras
d = keras.saving.load_model({str(path)!r})
assert isinstance(d, kl_keras.SequenceDistiller), type(d)
assert (d.divergence, d.temperature, d.chunk_size) == ("jeffreys", 3.0, 6)
assert not d.teacher.trainable
x, w = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "w.npy")!r})
loss = d.compute_loss(x, np.roll(x, -1, 1), None, w, training=False)
loss = float(keras.ops.convert_to_numpy(loss))
print("LOSS", loss)
d.fit(x, np.roll(x, -1, 1), sample_weight=w, epochs=1, batch_size=8, verbose=0)
"""
    output = run_in_fresh_process(code, tmp_path)
    loaded = float(output.split("LOSS")[1].split()[0])
    np.testing.assert_allclose(loaded, expected, rtol=1e-6)


# ------------------------------------------------------------------------------ KerasHub


def hub_models(kind):
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    if kind == "gpt2":

        def backbone(width, layers):
            return keras_hub.models.GPT2Backbone(
                vocabulary_size=V,
                num_layers=layers,
                num_heads=2,
                hidden_dim=width,
                intermediate_dim=2 * width,
                max_sequence_length=T,
            )

        model = keras_hub.models.GPT2CausalLM
    else:

        def backbone(width, layers):
            return keras_hub.models.GemmaBackbone(
                vocabulary_size=V,
                num_layers=layers,
                num_query_heads=2,
                num_key_value_heads=1,
                hidden_dim=width,
                intermediate_dim=2 * width,
                head_dim=width // 2,
            )

        model = keras_hub.models.GemmaCausalLM
    teacher = model(backbone=backbone(16, 2), preprocessor=None)
    student = model(backbone=backbone(8, 1), preprocessor=None)
    return teacher, student


def hub_data(seed=0):
    x, y, weights = data(seed, n=8)
    return {"token_ids": x, "padding_mask": weights.astype(bool)}, y, weights


@pytest.mark.parametrize("kind", ["gpt2", "gemma"])
def test_keras_hub_causal_lms_against_their_full_logits(kind):
    teacher, student = hub_models(kind)
    distiller = SequenceDistiller(teacher, student, temperature=2.0, chunk_size=5)
    x, y, weights = hub_data()
    # the weights come from x["padding_mask"] when no sample_weight is given
    loss = float(to_numpy(distiller.compute_loss(x, y, None, None, training=False)))
    expected = full_logits_loss(
        to_numpy(teacher(x)), to_numpy(student(x)), weights, temperature=2.0
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "gemma"])
def test_keras_hub_student_trains(kind):
    teacher, student = hub_models(kind)
    distiller = SequenceDistiller(teacher, student, chunk_size=16)
    distiller.compile(optimizer=keras.optimizers.Adam(0.01))
    x, y, weights = hub_data(1)
    history = distiller.fit(x, y, sample_weight=weights, epochs=5, batch_size=4, verbose=0)
    losses = history.history["distillation_loss"]
    assert losses[-1] < losses[0]


def test_public_name():
    assert kl_keras.SequenceDistiller is SequenceDistiller
