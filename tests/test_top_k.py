"""Offline distillation from a teacher's top-k: packing, both tails against float64, k = V
against LogitsDistillation, bad ids, the chunked form, files written and read back, and
SequenceDistiller trained from them.

The float64 references are built from the same float32 inputs (the stored log-probabilities
and the student's logits); the autodiff modes are in test_autodiff.py.
"""

import json

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, run_in_fresh_process, to_numpy, value_and_grad

import kl_keras
from kl_keras import _kernels
from kl_keras.distillation import (
    TopKDataset,
    TopKDistillation,
    pack_top_k,
    sequence_top_k_distillation_loss,
    teacher_top_k,
    unpack_top_k,
)

DIVERGENCES = ["kl", "reverse_kl", "jeffreys", "jensen_shannon"]
V = 13


def top_k_of(teacher_logits, k, temperature=1.0):
    """(ids, log_probs) of the k largest teacher log-probabilities, in float32."""
    log_p = ref.log_softmax(np.float64(teacher_logits) / temperature).astype("float32")
    ids = np.argsort(-log_p, axis=-1, kind="stable")[..., :k].astype("int32")
    return ids, np.take_along_axis(log_p, ids, axis=-1)


# The teacher's tail mass, 1 - sum(p), is summed in float64 where the backend has it; JAX
# without x64 resolves it to about 1e-8 absolute (documented), 1e-5 of a tail of 1e-3.
BUCKET_RTOL = 2e-6 if _kernels.widest_float() == "float64" else 2e-5


def problem(seed=0, shape=(3, 5)):
    rng = np.random.default_rng(seed)
    teacher = (2 * rng.normal(size=(*shape, V))).astype("float32")
    student = rng.normal(size=(*shape, V)).astype("float32")
    return teacher, student


# ---------------------------------------------------------------- packing


def test_pack_and_unpack_round_trip_ids_up_to_2_to_the_24():
    ids = np.array([[0, 1, 2**24 - 1], [5, 131071, 262143]], "int32")
    log_probs = np.log(np.array([[0.5, 0.25, 0.125], [0.3, 0.2, 0.1]], "float32"))
    packed = pack_top_k(ids, log_probs)
    assert isinstance(packed, np.ndarray) and packed.shape == (2, 6) and packed.dtype == "float32"
    back_ids, back_log_probs = unpack_top_k(packed)
    np.testing.assert_array_equal(to_numpy(back_ids), ids)
    np.testing.assert_array_equal(to_numpy(back_log_probs), log_probs)
    tensor = pack_top_k(keras.ops.convert_to_tensor(ids), keras.ops.convert_to_tensor(log_probs))
    np.testing.assert_array_equal(to_numpy(tensor), packed)


@pytest.mark.parametrize(
    "ids, log_probs, error, match",
    [
        (np.array([[-1, 2]]), np.zeros((1, 2)), ValueError, r"\[0, 2\^24\).*from -1"),
        (np.array([[2**24, 2]]), np.zeros((1, 2)), ValueError, "2\\^24"),
        (np.array([[1.0, 2.0]]), np.zeros((1, 2)), TypeError, "integer"),
        (np.array([[1, 2]]), np.zeros((1, 3)), ValueError, "log_probs"),
    ],
)
def test_pack_refuses_what_float32_cannot_carry(ids, log_probs, error, match):
    with pytest.raises(error, match=match):
        pack_top_k(ids, log_probs)


def test_unpack_refuses_an_odd_last_axis():
    with pytest.raises(ValueError, match="2k entries"):
        unpack_top_k(np.zeros((2, 5), "float32"))


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_bucket_with_k_equal_to_v_is_logits_distillation(name, temperature):
    teacher, student = problem(seed=1)
    y_true = pack_top_k(*top_k_of(teacher, V, temperature))
    for tail in ("bucket", "renormalize"):
        loss = TopKDistillation(tail, temperature, name, beta=0.3, reduction="none")
        full = kl_keras.LogitsDistillation(temperature, name, beta=0.3, reduction="none")
        np.testing.assert_allclose(
            to_numpy(loss(y_true, student)), to_numpy(full(teacher, student)), rtol=2e-6
        )


@pytest.mark.parametrize("k", [1, 4, 9])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_both_tails_against_float64(name, tail, k):
    teacher, student = problem(seed=2)
    for temperature in (1.0, 4.0):
        ids, log_probs = top_k_of(teacher, k, temperature)
        loss = TopKDistillation(tail, temperature, name, beta=0.3, reduction="none")
        actual = to_numpy(loss(pack_top_k(ids, log_probs), student))
        expected = ref.top_k(name, ids, log_probs, student, tail, temperature, beta=0.3)
        rtol = BUCKET_RTOL if tail == "bucket" else 2e-6
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-12)


@pytest.mark.skipif(
    BACKEND == "jax", reason="float64 on JAX needs jax_enable_x64 (documented: 1e-7 in float32)"
)
@pytest.mark.parametrize("name", DIVERGENCES)
def test_a_tiny_tail_keeps_its_digits(name):
    # The top 12 of 13 leave a tail of about 1e-4 to 1e-6: 1 - sum(p) in float32 would
    # resolve it to 1e-7 (1% and more of it); it is summed in float64.
    teacher, student = problem(seed=2)
    ids, log_probs = top_k_of(teacher, V - 1)
    actual = to_numpy(
        TopKDistillation(divergence=name, beta=0.3, reduction="none")(
            pack_top_k(ids, log_probs), student
        )
    )
    np.testing.assert_allclose(
        actual, ref.top_k(name, ids, log_probs, student, "bucket", 1.0, beta=0.3), rtol=2e-6
    )


def test_close_student_keeps_its_digits():
    # The student a few 1e-3 away from the teacher: KL about 1e-6 per token.
    rng = np.random.default_rng(3)
    teacher = (2 * rng.normal(size=(4, V))).astype("float32")
    student = (teacher + 2e-3 * rng.normal(size=teacher.shape)).astype("float32")
    # The renormalised form is the exact core's; the bucket adds two tails whose logarithms
    # are float32 numbers rounded apart (documented: to 1e-4 relative at KL of 1e-7, 1e-3
    # on JAX without x64).
    for tail, rtol in (("renormalize", 2e-6), ("bucket", 50 * BUCKET_RTOL)):
        ids, log_probs = top_k_of(teacher, 5)
        actual = to_numpy(
            TopKDistillation(tail, reduction="none")(pack_top_k(ids, log_probs), student)
        )
        expected = ref.top_k("kl", ids, log_probs, student, tail, 1.0)
        assert np.all(expected < 2e-6)
        np.testing.assert_allclose(actual, expected, rtol=rtol)


def test_the_tails_differ_as_documented():
    # A student that puts mass outside the teacher's top-k: the bucket sees it, the
    # renormalised form does not.
    teacher = np.array([[4.0, 3.0, -5.0, -5.0, -5.0]], "float32")
    student = np.array([[4.0, 3.0, 2.0, 2.0, 2.0]], "float32")
    y_true = pack_top_k(*top_k_of(teacher, 2))
    bucket = float(TopKDistillation("bucket")(y_true, student))
    renormalized = float(TopKDistillation("renormalize")(y_true, student))
    assert renormalized < 1e-6 < 0.1 < bucket


def test_minus_infinity_teacher_log_probabilities_are_allowed():
    teacher, student = problem(seed=4, shape=(2,))
    ids, log_probs = top_k_of(teacher, 4)
    log_probs[:, -1] = -np.inf  # a masked token among the top-k
    y_true = pack_top_k(ids, log_probs)
    for tail in ("bucket", "renormalize"):
        for name in ("kl", "jensen_shannon"):

            def fn(student, tail=tail, name=name):
                return TopKDistillation(tail, divergence=name, reduction="none")(y_true, student)

            values = to_numpy(fn(student))
            _, (gradient,) = value_and_grad(fn, student)
            np.testing.assert_allclose(
                values, ref.top_k(name, ids, log_probs, student, tail, 1.0, 0.5), rtol=2e-6
            )
            assert np.all(np.isfinite(gradient))


def test_top_k_holding_all_the_mass_gives_an_empty_bucket():
    # Teacher log-probabilities 0 and -inf: log(1 - sum(p)) is -inf, not NaN.
    student = np.array([[1.0, 0.0, -1.0, 0.5]], "float32")
    y_true = pack_top_k(np.array([[2, 0]]), np.array([[0.0, -np.inf]], "float32"))
    value = float(TopKDistillation("bucket")(y_true, student))
    q = ref.softmax(np.float64(student))[0]
    np.testing.assert_allclose(value, -np.log(q[2]), rtol=2e-6)  # KL of a point mass


def test_sample_weights_and_reductions_are_keras():
    teacher, student = problem(seed=5)
    y_true = pack_top_k(*top_k_of(teacher, 3))
    weights = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 1]], "float32")
    per_token = to_numpy(TopKDistillation(reduction="none")(y_true, student))
    for reduction, expected in (
        ("sum_over_batch_size", np.sum(per_token * weights) / weights.size),
        ("sum", np.sum(per_token * weights)),
        ("mean_with_sample_weight", np.sum(per_token * weights) / weights.sum()),
    ):
        loss = TopKDistillation(reduction=reduction)
        np.testing.assert_allclose(float(loss(y_true, student, weights)), expected, rtol=1e-6)


# ---------------------------------------------------------------- bad ids


@pytest.mark.parametrize(
    "ids, match", [([[3, 3]], "appears twice"), ([[3, V]], r"\[0, 13\)"), ([[-2, 0]], "from -2")]
)
def test_bad_ids_raise_when_eager(ids, match):
    _, student = problem(seed=6, shape=(1,))
    y_true = np.concatenate([np.float32(ids), np.zeros((1, 2), "float32")], axis=-1)
    with pytest.raises(ValueError, match=match):
        TopKDistillation()(y_true, student)


@pytest.mark.skipif(BACKEND == "torch", reason="PyTorch runs eagerly: it raises")
def test_bad_ids_give_nan_inside_a_compiled_step():
    _, student = problem(seed=7, shape=(3,))
    y_true = np.zeros((3, 4), "float32")
    y_true[:, :2] = [[1, 2], [4, 4], [0, V]]  # good, repeated, out of range
    loss = TopKDistillation(reduction="none")
    if BACKEND == "jax":
        import jax

        values = jax.jit(loss)(y_true, student)
    else:
        import tensorflow as tf

        values = tf.function(loss)(y_true, student)
    values = to_numpy(values)
    assert np.isfinite(values[0]) and np.all(np.isnan(values[1:]))


# ---------------------------------------------------------------- config


def test_config_round_trip_and_registered_name():
    loss = TopKDistillation("renormalize", 2.0, "jensen_shannon", beta=0.2, reduction="sum")
    config = loss.get_config()
    assert set(config) == {
        "name",
        "reduction",
        "tail",
        "temperature",
        "divergence",
        "beta",
        "dtype",
    }
    assert TopKDistillation.from_config(config).get_config() == config
    assert keras.saving.get_registered_name(TopKDistillation) == "kl_keras>TopKDistillation"
    with pytest.raises(ValueError, match="unknown keys"):
        TopKDistillation.from_config({**config, "k": 64})


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"tail": "drop"}, ValueError),
        ({"temperature": 0.0}, ValueError),
        ({"divergence": "binary_kl"}, ValueError),
        ({"beta": 2.0}, ValueError),
        ({"tail": 1}, ValueError),
    ],
)
def test_invalid_arguments_name_themselves(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        TopKDistillation(**kwargs)


# ---------------------------------------------------------------- chunked


def dyadic_problem(seed, n=(3, 11), h=8):
    """Hidden states and kernel on a dyadic grid: every float32 matmul of them is exact."""
    rng = np.random.default_rng(seed)
    hidden = (np.round(rng.normal(size=(*n, h)) * 8) / 8).astype("float32")
    kernel = (np.round(rng.normal(size=(h, V)) / np.sqrt(h) * 32) / 16).astype("float32")
    teacher = (2 * rng.normal(size=(*n, V))).astype("float32")
    mask = np.ones(n, "float32")
    mask[0, :3] = 0
    mask[2, 7:] = 0
    return hidden, kernel, teacher, mask


@pytest.mark.parametrize("backward", ["stored", "recompute"])
@pytest.mark.parametrize("chunk_size", [1, 7, 33])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_chunked_equals_the_loss_on_full_logits(tail, chunk_size, backward):
    hidden, kernel, teacher, mask = dyadic_problem(seed=8)
    y_true = pack_top_k(*top_k_of(teacher, 4, 2.0))

    def chunked(hidden, kernel):
        return sequence_top_k_distillation_loss(
            hidden,
            kernel,
            y_true,
            mask,
            tail,
            "jeffreys",
            temperature=2.0,
            chunk_size=chunk_size,
            backward=backward,
        )

    def dense(hidden, kernel):
        loss = TopKDistillation(tail, 2.0, "jeffreys", reduction="sum")
        return loss(y_true, keras.ops.matmul(hidden, kernel), mask) / np.sum(mask)

    value, grads = value_and_grad(chunked, hidden, kernel)
    expected_value, expected_grads = value_and_grad(dense, hidden, kernel)
    np.testing.assert_allclose(value, expected_value, rtol=2e-6)
    for g, e in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.max(np.abs(e)))


def test_chunked_never_reads_padding():
    hidden, kernel, teacher, mask = dyadic_problem(seed=9)
    y_true = pack_top_k(*top_k_of(teacher, 4))
    hidden[0, 0] = np.nan
    y_true[2, 8, :4] = 99.0  # bad ids, but padding
    value, (grad,) = value_and_grad(
        lambda h: sequence_top_k_distillation_loss(h, kernel, y_true, mask, chunk_size=5), hidden
    )
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[mask == 0], 0.0)


# ---------------------------------------------------------------- files and training


def language_model(width, seed, vocabulary=V, steps=6):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((steps,), dtype="int32")
    h = keras.layers.Embedding(vocabulary, width)(tokens)
    h = keras.layers.Dense(width, activation="tanh")(h)
    return keras.Model(tokens, keras.layers.Dense(vocabulary)(h))


def token_data(seed=10, rows=20, steps=6):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, size=(rows, steps)).astype("int32")
    mask = (np.arange(steps) < rng.integers(2, steps + 1, size=(rows, 1))).astype("float32")
    return x, mask


def test_teacher_top_k_returns_the_top_k_of_the_log_softmax():
    teacher = language_model(16, 0)
    x, _ = token_data()
    result = teacher_top_k(teacher, x, k=4, temperature=2.0, batch_size=8)
    logits = np.float64(to_numpy(teacher(x)))
    ids, log_probs = top_k_of(logits, 4, 2.0)
    np.testing.assert_array_equal(result["x"], x)
    np.testing.assert_array_equal(result["ids"], ids)
    np.testing.assert_allclose(result["log_probs"], log_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result["mask"], np.ones(x.shape, "float32"))
    assert result["ids"].dtype == np.int32 and result["log_probs"].dtype == np.float32


def test_files_are_written_in_shards_read_back_streamed_and_resumed(tmp_path):
    teacher = language_model(16, 0)
    x, mask = token_data()
    batches = [(x[i : i + 8], None, mask[i : i + 8]) for i in range(0, 20, 8)]
    path = teacher_top_k(teacher, batches, k=3, path=tmp_path / "top")
    index = json.loads((path / "index.json").read_text())
    assert index["shards"] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert index["k"] == 3 and index["vocabulary_size"] == V
    dataset = TopKDataset(path)
    assert len(dataset) == 3
    x1, y1, mask1 = dataset[1]
    np.testing.assert_array_equal(x1, x[8:16])
    np.testing.assert_array_equal(mask1, mask[8:16])
    ids, log_probs = top_k_of(np.float64(to_numpy(teacher(x[8:16]))), 3)
    np.testing.assert_array_equal(to_numpy(unpack_top_k(y1)[0]), ids)
    # Resume: a run that stopped after the first shard redoes only the others. A changed
    # teacher shows which shards were computed again.
    (path / "shard-00001.npz").unlink()
    (path / "shard-00002.npz").unlink()
    (path / "index.json").unlink()
    before = (path / "shard-00000.npz").read_bytes()
    teacher_top_k(language_model(16, 1), batches, k=3, path=path)
    assert (path / "shard-00000.npz").read_bytes() == before
    changed = TopKDataset(path)[1][1]
    assert not np.array_equal(changed, y1)


@pytest.mark.slow
def test_sequence_distiller_from_top_k_files_equals_the_live_teacher_with_k_equal_to_v(tmp_path):
    """With k = V the files hold the whole distribution: training from them is training
    from the live teacher; with k = 3 it trains, and the distiller saves and loads."""
    teacher, student = language_model(16, 0), language_model(8, 1)
    x, mask = token_data()
    batches = [(x[i : i + 10], None, mask[i : i + 10]) for i in (0, 10)]
    path = teacher_top_k(teacher, batches, k=V, path=tmp_path / "all")
    initial = student.get_weights()
    live = kl_keras.SequenceDistiller(teacher, student, chunk_size=16)
    live.compile(keras.optimizers.SGD(0.5))
    live_history = live.fit(
        x, x, sample_weight=mask, batch_size=10, epochs=2, shuffle=False, verbose=0
    )
    live_weights = student.get_weights()
    student.set_weights(initial)
    offline = kl_keras.SequenceDistiller(None, student, chunk_size=16)
    offline.compile(keras.optimizers.SGD(0.5))
    history = offline.fit(TopKDataset(path), epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        history.history["distillation_loss"], live_history.history["distillation_loss"], rtol=2e-5
    )
    assert history.history["tokens"] == live_history.history["tokens"]
    for a, b in zip(student.get_weights(), live_weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    offline.save(tmp_path / "offline.keras")
    output = run_in_fresh_process(
        """
        import keras
        import kl_keras
        model = keras.models.load_model("offline.keras")
        assert model.teacher is None and model.tail == "bucket"
        print("loaded", type(model).__name__)
        """,
        cwd=tmp_path,
    )
    assert "loaded SequenceDistiller" in output


def test_sequence_distiller_without_a_teacher_refuses_what_it_cannot_do():
    student = language_model(8, 1)
    with pytest.raises(ValueError, match="student_loss_weight"):
        kl_keras.SequenceDistiller(None, student, student_loss_weight=0.5)
    with pytest.raises(ValueError, match="tail"):
        kl_keras.SequenceDistiller(None, student, tail="drop")
    config = kl_keras.SequenceDistiller(None, student, tail="renormalize").get_config()
    assert config["teacher"] is None and config["tail"] == "renormalize"
    again = kl_keras.SequenceDistiller.from_config(config)
    assert again.teacher is None and again.tail == "renormalize"


@pytest.mark.slow
def test_a_student_compiled_with_the_loss_trains_saves_and_loads(tmp_path):
    teacher, student = language_model(16, 0), language_model(8, 1)
    x, mask = token_data()
    top = teacher_top_k(teacher, x, k=5, temperature=2.0)
    y = pack_top_k(top["ids"], top["log_probs"])
    student.compile("adam", loss=TopKDistillation("renormalize", 2.0, "jensen_shannon", 0.3))
    history = student.fit(x, y, sample_weight=mask, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    student.save(tmp_path / "student.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", to_numpy(student.predict(x, verbose=0)))
    output = run_in_fresh_process(
        """
        import keras, numpy as np
        import kl_keras
        model = keras.models.load_model("student.keras")
        assert model.loss.get_config() == kl_keras.TopKDistillation(
            "renormalize", 2.0, "jensen_shannon", 0.3).get_config(), model.loss.get_config()
        difference = np.abs(model.predict(np.load("x.npy"), verbose=0) - np.load("expected.npy"))
        print("difference", difference.max())
        """,
        cwd=tmp_path,
    )
    assert float(output.split()[-1]) < 1e-6
