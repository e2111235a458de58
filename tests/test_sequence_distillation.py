"""sequence_distillation_loss: chunked equals dense, heads, padding, precision, bad inputs.

The dense reference forms the full logits in float64 from the same float32 inputs. The
autodiff modes are in test_autodiff.py (the case `sequence_distillation_loss`, with the
modes each backend's rematerialisation supports).
"""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, to_numpy, value_and_grad

from kl_keras import LogitsDistillation
from kl_keras.distillation import sequence_distillation_loss

DIVERGENCES = ["kl", "reverse_kl", "jeffreys", "jensen_shannon"]
B, T, H, V = 3, 11, 8, 13  # N = 33 tokens


def padding_mask():
    """Padding at the start, in the middle and at the end of the sequences."""
    mask = np.ones((B, T), "float32")
    mask[0, :3] = 0
    mask[1, 4:6] = 0
    mask[2, 7:] = 0
    return mask


def problem(seed=0, close=False):
    """Hidden states and kernel on a coarse dyadic grid, so that every float32 matmul of
    them is exact (whatever the order of its sums): what is compared with float64 is the
    divergence and the chunked sums, not the rounding of a matmul, which differs between
    kernels and would dominate where the teacher is close."""
    rng = np.random.default_rng(seed)
    hidden = (np.round(rng.normal(size=(B, T, H)) * 8) / 8).astype("float32")
    kernel = (np.round(rng.normal(size=(H, V)) / np.sqrt(H) * 2 * 16) / 16).astype("float32")
    if close:  # a converged student: the teacher's logits a few 1e-3 away
        teacher = hidden.astype(np.float64) @ kernel + 1e-3 * rng.normal(size=(B, T, V))
        teacher = teacher.astype("float32")
    else:
        teacher = (2 * rng.normal(size=(B, T, V))).astype("float32")
    return hidden, kernel, teacher, padding_mask()


def dense_reference(name, hidden, kernel, teacher, mask, temperature, beta=0.3, bias=0.0):
    """The loss and its gradients with respect to the hidden states and the kernel, in
    float64 from the full logits."""
    logits = np.float64(hidden) @ np.float64(kernel) + np.float64(bias)
    values, _, grad_logits = ref.on_logits_with_gradients(
        name, teacher.reshape(-1, V), logits.reshape(-1, V), temperature, beta, np.float64
    )
    weights = np.float64(mask).reshape(-1, 1) / np.sum(mask)
    grad_logits = grad_logits * weights
    loss = np.sum(values * weights[:, 0])
    grad_hidden = (grad_logits @ np.float64(kernel).T).reshape(hidden.shape)
    grad_kernel = np.float64(hidden).reshape(-1, H).T @ grad_logits
    return loss, grad_hidden, grad_kernel


def assert_gradient_close(actual, expected, tolerance=1e-5):
    scale = np.max(np.abs(expected))
    np.testing.assert_array_less(np.abs(actual - expected), tolerance * scale + 1e-30)


# Every divergence at both temperatures with chunks of 1, of 7 (33 = 4·7 + 5), larger than N
# and exactly N; close to its teacher with a partial and a whole chunk.
CHUNKINGS = (
    [
        (name, temperature, chunk_size, False)
        for name in DIVERGENCES
        for temperature in (1.0, 4.0)
        for chunk_size in (1, 7, 256, 33)
    ]
    + [(name, 1.0, 33, True) for name in DIVERGENCES]
    + [(name, 4.0, 7, True) for name in DIVERGENCES]
)


@pytest.mark.numerics
@pytest.mark.parametrize(
    "name, temperature, chunk_size, close",
    CHUNKINGS,
    ids=[f"{n}-T{t:g}-chunk{c}{'-close' if close else ''}" for n, t, c, close in CHUNKINGS],
)
def test_chunked_equals_dense(name, temperature, chunk_size, close):
    hidden, kernel, teacher, mask = problem(close=close)
    loss, grads = value_and_grad(
        lambda h, k: sequence_distillation_loss(
            h, k, teacher, mask, name, beta=0.3, temperature=temperature, chunk_size=chunk_size
        ),
        hidden,
        kernel,
    )
    expected, grad_hidden, grad_kernel = dense_reference(
        name, hidden, kernel, teacher, mask, temperature
    )
    assert 1e-9 < expected < 1e-4 if close else expected > 1e-2
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    assert_gradient_close(grads[0], grad_hidden)
    assert_gradient_close(grads[1], grad_kernel)
    assert np.all(grads[0][mask == 0] == 0)  # padding receives no gradient


@pytest.mark.parametrize("backward", ["stored", "recompute"])
@pytest.mark.parametrize("close", [False, True], ids=["far", "close"])
@pytest.mark.parametrize("name", DIVERGENCES)
def test_each_backward_gives_the_dense_gradients(name, close, backward):
    # "stored": each chunk's gradient formed in the forward pass and kept (the default, in
    # the grid above); "recompute": each chunk rematerialised in the backward pass.
    hidden, kernel, teacher, mask = problem(seed=18, close=close)
    loss, grads = value_and_grad(
        lambda h, k: sequence_distillation_loss(
            h, k, teacher, mask, name, beta=0.3, temperature=2.0, chunk_size=7, backward=backward
        ),
        hidden,
        kernel,
    )
    expected, grad_hidden, grad_kernel = dense_reference(name, hidden, kernel, teacher, mask, 2.0)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    assert_gradient_close(grads[0], grad_hidden)
    assert_gradient_close(grads[1], grad_kernel)
    assert np.all(grads[0][mask == 0] == 0)


def test_matches_logits_distillation_on_the_full_logits():
    hidden, kernel, teacher, mask = problem(seed=1)
    dense = LogitsDistillation(2.0, "jeffreys")(teacher, hidden @ kernel, sample_weight=mask)
    # Keras's "sum_over_batch_size" divides by every token, this loss by the real ones.
    expected = float(dense) * mask.size / mask.sum()
    loss = sequence_distillation_loss(
        hidden, kernel, teacher, mask, "jeffreys", temperature=2.0, chunk_size=5
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def dense_layer(kernel, bias):
    dense = keras.layers.Dense(V)
    dense.build((None, H))
    dense.set_weights([kernel, bias])
    return dense


def head(form, dense):
    return {
        "kernel and bias": (to_numpy(dense.kernel), to_numpy(dense.bias)),
        "variables": (dense.kernel, dense.bias),
        "Dense layer": dense,
        "function of a layer": lambda h: dense(h),
    }[form]


FORMS = ["kernel and bias", "variables", "Dense layer", "function of a layer"]


@pytest.mark.parametrize("form", FORMS)
def test_head_forms_give_the_same_loss_and_gradients(form):
    hidden, kernel, teacher, mask = problem(seed=2)
    bias = np.random.default_rng(3).normal(size=(V,)).astype("float32")
    projection = head(form, dense_layer(kernel, bias))
    loss, (grad_hidden,) = value_and_grad(
        lambda h: sequence_distillation_loss(h, projection, teacher, mask, chunk_size=4), hidden
    )
    expected, grad_expected, _ = dense_reference(
        "kl", hidden, kernel, teacher, mask, 1.0, bias=bias
    )
    np.testing.assert_allclose(float(loss), expected, rtol=2e-6)
    assert_gradient_close(grad_hidden, grad_expected)


@pytest.mark.parametrize("form", ["variables", "Dense layer", "function of a layer"])
@pytest.mark.parametrize("backward", ["recompute", "stored"])
def test_head_variables_receive_their_gradient_once(form, backward):
    hidden, kernel, teacher, mask = problem(seed=4)
    dense = dense_layer(kernel, np.zeros((V,), "float32"))
    projection = head(form, dense)
    gradient = variable_gradients(
        lambda: sequence_distillation_loss(
            hidden, projection, teacher, mask, chunk_size=5, backward=backward
        ),
        dense.kernel,
    )
    _, _, expected = dense_reference("kl", hidden, kernel, teacher, mask, 1.0)
    assert_gradient_close(gradient, expected)


def variable_gradients(loss_fn, variable):
    """d loss / d variable with the backend's autodiff, the variable read inside loss_fn."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        return to_numpy(tape.gradient(loss, variable.value))
    if BACKEND == "jax":
        import jax

        def stateless(value):
            with keras.StatelessScope([(variable, value)]):
                return loss_fn()

        return to_numpy(jax.grad(stateless)(variable.value))
    import torch

    loss = loss_fn()
    return to_numpy(torch.autograd.grad(loss, variable.value)[0])


def test_teacher_from_hidden_states_and_a_head():
    hidden, kernel, _, mask = problem(seed=5)
    rng = np.random.default_rng(6)
    teacher_hidden = rng.normal(size=(B, T, 2 * H)).astype("float32")
    teacher_kernel = rng.normal(size=(2 * H, V)).astype("float32")
    teacher_logits = teacher_hidden @ teacher_kernel
    loss, grads = value_and_grad(
        lambda h, th, tk: sequence_distillation_loss(
            h, kernel, (th, tk), mask, "jensen_shannon", chunk_size=6
        ),
        hidden,
        teacher_hidden,
        teacher_kernel,
    )
    expected, grad_hidden, _ = dense_reference(
        "jensen_shannon", hidden, kernel, teacher_logits, mask, 1.0, beta=0.5
    )
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert_gradient_close(grads[0], grad_hidden)
    for grad in grads[1:]:  # the teacher receives no gradient
        assert grad is None or np.all(grad == 0)


def test_rows_without_a_sequence_axis():
    hidden, kernel, teacher, mask = problem(seed=7)
    as_sequences = sequence_distillation_loss(hidden, kernel, teacher, mask, chunk_size=4)
    as_rows = sequence_distillation_loss(
        hidden.reshape(-1, H), kernel, teacher.reshape(-1, V), mask.reshape(-1), chunk_size=4
    )
    np.testing.assert_allclose(float(as_rows), float(as_sequences), rtol=1e-6)


def test_token_weights_and_no_mask():
    hidden, kernel, teacher, _ = problem(seed=8)
    weights = np.random.default_rng(9).uniform(0, 2, size=(B, T)).astype("float32")
    for mask in (weights, None):
        loss = sequence_distillation_loss(hidden, kernel, teacher, mask, chunk_size=10)
        w = np.ones((B, T)) if mask is None else np.float64(mask)
        values = ref.on_logits("kl", np.float64(teacher), np.float64(hidden) @ kernel, 1.0)
        np.testing.assert_allclose(float(loss), np.sum(w * values) / np.sum(w), rtol=2e-6)


def test_padding_is_never_read():
    hidden, kernel, teacher, mask = problem(seed=10)
    clean = sequence_distillation_loss(hidden, kernel, teacher, mask, chunk_size=4)
    hidden = hidden.copy()
    teacher = teacher.copy()
    hidden[mask == 0] = np.nan
    teacher[mask == 0] = np.inf
    loss, grads = value_and_grad(
        lambda h, k: sequence_distillation_loss(h, k, teacher, mask, chunk_size=4), hidden, kernel
    )
    np.testing.assert_allclose(float(loss), float(clean), rtol=1e-6)
    assert np.all(np.isfinite(grads[1]))
    assert np.all(grads[0][mask == 0] == 0)


def test_every_token_padding_gives_zero_with_zero_gradients():
    hidden, kernel, teacher, _ = problem(seed=11)
    loss, grads = value_and_grad(
        lambda h, k: sequence_distillation_loss(h, k, teacher, np.zeros((B, T)), chunk_size=4),
        hidden,
        kernel,
    )
    assert float(loss) == 0.0
    assert np.all(grads[0] == 0) and np.all(grads[1] == 0)


def test_nan_hidden_state_of_a_real_token_gives_nan():
    hidden, kernel, teacher, mask = problem(seed=12)
    hidden = hidden.copy()
    hidden[1, 0, 3] = np.nan
    loss, grads = value_and_grad(
        lambda h, k: sequence_distillation_loss(h, k, teacher, mask, chunk_size=4), hidden, kernel
    )
    assert np.isnan(float(loss))
    assert np.all(np.isnan(grads[0][1, 0]))
    assert np.isnan(grads[1]).any()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_hidden_states_give_the_float32_answer_of_the_rounded_inputs(dtype):
    hidden, kernel, teacher, mask = problem(seed=13)
    rounded = keras.ops.cast(hidden, dtype)
    loss = sequence_distillation_loss(rounded, keras.ops.cast(kernel, dtype), teacher, mask)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    exact = sequence_distillation_loss(
        keras.ops.cast(rounded, "float32"),
        keras.ops.cast(keras.ops.cast(kernel, dtype), "float32"),
        teacher,
        mask,
    )
    np.testing.assert_allclose(float(loss), float(exact), rtol=1e-7)


@pytest.mark.skipif(BACKEND == "jax", reason="JAX computes float64 in float32 unless x64")
def test_float64_inputs_are_computed_in_float64():
    hidden, kernel, teacher, mask = problem(seed=14)
    loss = sequence_distillation_loss(np.float64(hidden), np.float64(kernel), teacher, mask)
    assert keras.backend.standardize_dtype(loss.dtype) == "float64"
    expected, _, _ = dense_reference("kl", hidden, kernel, teacher, mask, 1.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-12)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA's memory analysis of the compiled step")
@pytest.mark.parametrize("backward", ["stored", "recompute"])
def test_no_tensor_of_every_token_and_the_vocabulary_is_alive_at_once(backward):
    import jax

    n, h, v, chunk = 4096, 32, 4096, 64
    rng = np.random.default_rng(15)
    hidden = rng.normal(size=(n, h)).astype("float32")
    kernel = rng.normal(size=(h, v)).astype("float32")
    teacher = rng.normal(size=(n, v)).astype("float32")
    full_logits = n * v * 4  # bytes of one (N, V) float32 tensor

    def temporary_bytes(loss):
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return step.lower(hidden, kernel, teacher).compile().memory_analysis().temp_size_in_bytes

    fused = temporary_bytes(
        lambda x, k, t: sequence_distillation_loss(x, k, t, chunk_size=chunk, backward=backward)
    )
    dense = temporary_bytes(
        lambda x, k, t: keras.ops.mean(LogitsDistillation(reduction="none")(t, x @ k))
    )
    assert dense > 2 * full_logits  # the dense step holds several (N, V) tensors
    assert fused < full_logits / 4


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow's while loops in a graph")
@pytest.mark.parametrize("backward, least", [("recompute", 2), ("stored", 1)])
def test_chunks_run_one_after_another_in_a_tensorflow_graph(backward, least):
    # tf.map_fn runs 10 iterations of a graph's loop at once unless told otherwise: ten
    # chunks' temporaries alive together (measured: 2.5x the peak memory, no faster).
    import tensorflow as tf

    hidden, kernel, teacher, mask = problem(seed=17)

    @tf.function
    def step(hidden, kernel):
        with tf.GradientTape() as tape:
            tape.watch(kernel)
            loss = sequence_distillation_loss(
                hidden, kernel, teacher, mask, chunk_size=4, backward=backward
            )
        return tape.gradient(loss, kernel)

    graph = step.get_concrete_function(hidden, kernel).graph.as_graph_def()
    loops = [
        node
        for function in graph.library.function
        for node in function.node_def
        if node.op in ("While", "StatelessWhile")
    ] + [node for node in graph.node if node.op in ("While", "StatelessWhile")]
    assert len(loops) >= least  # the forward loop (and, recomputing, its gradient's)
    assert {node.attr["parallel_iterations"].i for node in loops} == {1}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"divergence": "binary_kl"}, "divergence"),
        ({"beta": 1.5}, "beta"),
        ({"mask": np.ones((B, T + 1))}, r"mask.*\(3, 11\).*\(3, 12\)"),
        ({"student_head": np.ones((H + 1, V))}, r"student_head.*\(9, 13\)"),
        ({"student_head": (np.ones((H, V)), np.ones(V + 1))}, "bias"),
        ({"student_head": (np.ones((H, V)),) * 3}, "student_head"),
        ({"student_head": lambda h: h[:, 0]}, "callable head"),
        ({"teacher": np.ones((B, T - 1, V))}, r"teacher.*\(3, 10, 13\)"),
        ({"teacher": np.ones((B, T, V + 2))}, r"teacher.*\(3, 11, 15\)"),
        ({"teacher": (np.ones((B, T, H)), np.ones((H, V + 2)))}, "teacher 15, student 13"),
        ({"teacher": (np.ones((B, T, H)),)}, "teacher"),
        ({"student_hidden": np.ones((H,))}, "student_hidden"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, match):
    hidden, kernel, teacher, mask = problem(seed=16)
    arguments = {
        "student_hidden": hidden,
        "student_head": kernel,
        "teacher": teacher,
        "mask": mask,
        **kwargs,
    }
    error = TypeError if kwargs.get("chunk_size") in (2.5, True) else ValueError
    with pytest.raises(error, match=match):
        sequence_distillation_loss(**arguments)
