"""The one place that walks rows chunk by chunk: a weighted mean over rows that never holds
more than one chunk's temporaries.

Infrastructure, not math: `token_mean` takes a per-row function (a divergence from logits
that a head computes inside the chunk, a cross-entropy) and returns the weighted mean of
its values over the global batch. Every tensor a chunk needs is an explicit argument of the
function that computes the chunk (TensorFlow's `tf.recompute_grad` cannot differentiate a
tensor the function captures). Its gradient is formed one of two ways: each chunk
rematerialised in the backward pass (`keras.remat`), or each chunk's gradient formed in the
forward pass and kept (`_kernels.stored_gradient_sum`). Either way the chunks run one after
another on every backend: at most one chunk's temporaries are alive, whatever the number of
rows.
"""

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from kl_keras import _distribute, _kernels
from kl_keras._types import Tensor


def in_chunks(x: Tensor, chunk_size: int) -> Tensor:
    """Rows (N, ...) as (ceil(N / chunk_size), chunk_size, ...), zero rows appended (a copy
    of `x` only where N is not known to be a multiple of `chunk_size`)."""
    missing = (-ops.shape(x)[0]) % chunk_size
    if not (isinstance(missing, int) and missing == 0):
        x = ops.concatenate([x, ops.zeros((missing, *x.shape[1:]), x.dtype)], axis=0)
    return ops.reshape(x, (-1, chunk_size, *x.shape[1:]))


BACKWARDS = ("recompute", "stored")


def token_mean(
    per_row: Callable[..., Tensor],
    arrays: Sequence[Tensor],
    weights: Tensor,
    params: Sequence[Tensor],
    chunk_size: int,
    backward: str = "stored",
    frozen_params: Sequence[Tensor] = (),
) -> Tensor:
    """sum(weights * per_row(*arrays, *params, *frozen_params)) / sum(weights), over rows,
    in chunks.

    `per_row` maps a chunk of each of `arrays` (rows first) and the parameters to one value
    per row. The gradient flows to the weights, the first array (the hidden states) and
    `params`; the other arrays (a teacher's rows, targets) and `frozen_params` (a
    teacher's head) are data: `per_row` must not let a gradient reach them, and the stored
    form forms none. It sees the chunks `chunk_size` rows at a time, one chunk after
    another; rows of weight 0 are replaced by zeros before it sees them, and left out.
    Both sums are over the global batch (all-reduced inside a `tf.distribute` replica);
    with no weight above 0 the mean is 0 with zero gradients.

    `backward` is how the gradient is formed: `"recompute"`, each chunk rematerialised in
    the backward pass (`keras.remat`: the autodiff modes of each backend's
    rematerialisation); `"stored"`, each chunk's gradient formed in the forward pass and
    kept (`_kernels.stored_gradient_sum`: no chunk computed twice, fewer autodiff modes).
    """
    if isinstance(weights.shape[0], int):
        chunk_size = max(1, min(chunk_size, weights.shape[0]))

    def chunk_total(chunk_weights: Tensor, *chunk_and_params: Tensor) -> Tensor:
        real = chunk_weights > 0
        chunk = [
            ops.where(ops.reshape(real, (-1,) + (1,) * (len(x.shape) - 1)), x, ops.zeros_like(x))
            for x in chunk_and_params[: len(arrays)]
        ]
        values = per_row(*chunk, *chunk_and_params[len(arrays) :])
        return ops.sum(ops.where(real, values, 0.0) * chunk_weights)

    chunks = tuple(in_chunks(x, chunk_size) for x in (weights, *arrays))
    if backward == "stored":
        total = _kernels.stored_gradient_sum(
            chunk_total, chunks[:2], params, weights.dtype, chunks[2:], frozen_params
        )
    else:
        rematerialised = keras.remat(chunk_total)
        total = ops.sum(
            _kernels.sequential_map(
                lambda chunk: rematerialised(*chunk, *params, *frozen_params),
                chunks,
                weights.dtype,
            )
        )
    total, count = _distribute.global_sums(total, ops.sum(weights))
    has_tokens = count > 0
    return ops.where(has_tokens, total / ops.where(has_tokens, count, 1.0), 0.0)


def rows(x: Any, leading: tuple[Any, ...], name: str, size: Any = None) -> Tensor:
    """`x` of shape `leading + (size,)` (or `leading` when `size` is None), as rows;
    a `ValueError` naming `name` when its shape is another."""
    x = ops.convert_to_tensor(x)
    expected = leading if size is None else (*leading, size)
    if len(x.shape) != len(expected) or any(
        a is not None and b is not None and a != b for a, b in zip(x.shape, expected, strict=True)
    ):
        raise ValueError(
            f"Invalid `{name}`: expected shape {expected}, matching the student's hidden "
            f"states. Received shape {tuple(x.shape)}."
        )
    return ops.reshape(x, (-1,) if size is None else (-1, x.shape[-1]))


def token_weights(mask: Any, leading: tuple[Any, ...], count: Any, dtype: str) -> Tensor:
    """The weight of each row: `mask` as rows, or 1 for each of `count` rows."""
    if mask is None:
        return ops.ones(count, dtype)
    return ops.cast(rows(mask, leading, "mask"), dtype)
