"""Offline distillation from a teacher's top-k: its k most likely tokens and their
log-probabilities, stored once, against the student's full logits.

A full float32 distribution over 262144 tokens is 1 MB a token; the top 64 ids and
log-probabilities are 512 bytes. What the top-k leave out, the teacher's mass on every other
token, is handled one of two ways (`tail`): a (k+1)-th "tail" bucket on both sides, or the
teacher renormalised over its top-k and the student over the same ids.
"""

import json
import math
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import keras
import numpy as np
from keras import ops

from kl_keras import _checks, _kernels, _shell
from kl_keras import divergence as core
from kl_keras._types import Config, Tensor

TAILS = ("bucket", "renormalize")
EXACT_IDS = 2**24  # float32 holds every integer up to 2^24 exactly
FORMAT = "kl_keras.top_k/1"  # the `format` of a top-k directory's index.json


def pack_top_k(ids: Any, log_probs: Any) -> Any:
    """One float32 array of shape (..., 2k) holding the top-k ids and their log-probabilities.

    Keras's `fit` carries one `y` per sample on every backend; this is that `y` for
    `TopKDistillation`: the ids (exact in float32 up to 2^24 = 16777216) then the
    log-probabilities, along the last axis. NumPy arrays in give a NumPy array (for a
    data pipeline); tensors give a tensor. `unpack_top_k` splits it again.

    Args:
        ids: the token ids, integers in [0, 2^24), shape (..., k).
        log_probs: their log-probabilities, the same shape.

    Returns:
        The packed targets, float32, shape (..., 2k).

    Raises:
        ValueError: shapes differ, or an id is negative or not below 2^24 (checked where
            the ids are concrete values).
    """
    if tuple(np.shape(ids)) != tuple(np.shape(log_probs)):
        raise ValueError(
            "Invalid `log_probs`: expected the shape of `ids`, "
            f"{tuple(np.shape(ids))}. Received shape {tuple(np.shape(log_probs))}."
        )
    concrete = _concrete(ids)
    if concrete is not None and concrete.size:
        if not np.issubdtype(concrete.dtype, np.integer):
            raise TypeError(
                "Invalid type for argument `ids`. Expected integer token ids. "
                f"Received: ids of dtype {concrete.dtype}"
            )
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= EXACT_IDS:
            raise ValueError(
                "Invalid value for argument `ids`. Expected token ids in [0, 2^24), which "
                f"float32 holds exactly. Received ids from {low} to {high}."
            )
    if isinstance(ids, np.ndarray) and isinstance(log_probs, np.ndarray):
        return np.concatenate([ids.astype("float32"), log_probs.astype("float32")], axis=-1)
    ids = ops.cast(ops.convert_to_tensor(ids), "float32")
    return ops.concatenate([ids, ops.cast(ops.convert_to_tensor(log_probs), "float32")], -1)


def unpack_top_k(y_true: Any) -> tuple[Tensor, Tensor]:
    """`(ids, log_probs)` of packed top-k targets (`pack_top_k`): int32 and float32, each
    of shape (..., k)."""
    y_true = ops.convert_to_tensor(y_true)
    size = y_true.shape[-1]
    if size is None or size % 2:
        raise ValueError(
            "Invalid packed top-k targets: expected a last axis of 2k entries (k ids, then "
            f"their k log-probabilities). Received shape {tuple(y_true.shape)}."
        )
    k = size // 2
    ids = ops.cast(ops.round(y_true[..., :k]), "int32")
    return ids, ops.cast(y_true[..., k:], "float32")


def _concrete(x: Any) -> np.ndarray | None:
    """`x` as a NumPy array where it holds values now (eager), None inside a trace."""
    if isinstance(x, (np.ndarray, list, tuple, int, float)):
        return np.asarray(x)
    try:
        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # a tracer (JAX), a graph tensor (TensorFlow), a vmapped tensor
        return None


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, precise on both sides: log(-expm1(x)) near 0, log1p(-e^x)
    below -log 2 (M. Mächler, "Accurately computing log(1 - exp(-|a|))", 2012); -inf at
    x >= 0, where the top-k hold all the mass (a sum rounded above 1 included)."""
    near = x > -math.log(2.0)
    safe = ops.where(x < 0, x, -1.0)
    value = ops.where(near, ops.log(-ops.expm1(safe)), ops.log1p(-ops.exp(safe)))
    return ops.where(x < 0, value, float("-inf"))


def _valid_ids(ids: Tensor, vocabulary_size: int) -> Tensor:
    """True for each row whose ids are all in [0, V) and all different."""
    in_range = ops.all(ops.logical_and(ids >= 0, ids < vocabulary_size), axis=-1)
    ordered = ops.sort(ids, axis=-1)
    repeated = ops.any(ordered[..., 1:] == ordered[..., :-1], axis=-1)
    return ops.logical_and(in_range, ops.logical_not(repeated))


def _check_ids_now(ids: Tensor, vocabulary_size: int, weights: Any = None) -> None:
    """A `ValueError` for out-of-range or repeated ids, where they are concrete values;
    rows of weight 0 (padding) are not checked."""
    concrete = _concrete(ids)
    if concrete is None or not concrete.size:
        return
    rows = concrete.reshape(-1, concrete.shape[-1])
    if weights is not None:
        real = _concrete(weights)
        if real is None:
            return
        rows = rows[np.broadcast_to(real, concrete.shape[:-1]).reshape(-1) > 0]
        if not rows.size:
            return
    if rows.min() < 0 or rows.max() >= vocabulary_size:
        raise ValueError(
            f"Invalid top-k ids: expected ids in [0, {vocabulary_size}) for logits of "
            f"{vocabulary_size} entries. Received ids from {rows.min()} to {rows.max()}."
        )
    ordered = np.sort(rows, axis=-1)
    repeated = np.flatnonzero(np.any(ordered[:, 1:] == ordered[:, :-1], axis=-1))
    if repeated.size:
        raise ValueError(
            "Invalid top-k ids: an id appears twice among a token's top-k, in "
            f"{repeated.size} of {len(rows)} tokens (the first: row {repeated[0]}, ids "
            f"{rows[repeated[0]].tolist()})."
        )


def _complement_log_sum_exp(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """T · log(sum of exp(z / T) over the entries not in `ids`), per row: -inf when `ids`
    cover the row. Summed directly over those entries, so nothing cancels however much of
    the mass the top-k hold."""
    shape = ops.shape(logits)
    rows = ops.reshape(logits, (-1, logits.shape[-1]))
    flat_ids = ops.reshape(ids, (-1, ids.shape[-1]))
    count, k = ops.shape(rows)[0], flat_ids.shape[-1]
    row_index = ops.broadcast_to(ops.arange(count, dtype="int32")[:, None], ops.shape(flat_ids))
    indices = ops.reshape(ops.stack([row_index, flat_ids], axis=-1), (-1, 2))
    # scatter_update, not scatter: Keras's PyTorch `scatter` loops over the indices in
    # Python (one step per id, and no run on the meta device of a symbolic build).
    zeros = ops.zeros((count, rows.shape[-1]))
    chosen = ops.scatter_update(zeros, indices, ops.ones((count * k,)))
    rest = ops.where(chosen > 0, float("-inf"), rows / temperature)
    peak = ops.stop_gradient(ops.max(rest, axis=-1, keepdims=True))
    peak = ops.where(ops.isfinite(peak), peak, 0.0)
    total = peak[:, 0] + ops.log(ops.sum(ops.exp(rest - peak), axis=-1))
    return temperature * ops.reshape(total, shape[:-1])


def top_k_divergence_values(
    divergence: str,
    ids: Tensor,
    log_probs: Tensor,
    logits: Tensor,
    tail: str,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """T²·D(teacher ‖ student) per token from the teacher's top-k and the student's logits.

    `ids` (int, (..., k)) and `log_probs` ((..., k), the teacher's log-probabilities at
    temperature T) against `logits` ((..., V), the student's). The arguments were checked
    by the caller; a row with an id out of [0, V) or repeated gives NaN.
    """
    vocabulary_size = int(logits.shape[-1])
    valid = _valid_ids(ids, vocabulary_size)
    safe_ids = ops.where(ops.logical_and(ids >= 0, ids < vocabulary_size), ids, 0)
    picked = ops.take_along_axis(logits, safe_ids, axis=-1)
    # The teacher as logits at temperature T (T · log p, so that the core's a / T is log p);
    # the student's own logits, divided by T in the core after the difference is formed.
    teacher = temperature * log_probs
    student = picked
    # With k = V there is nothing outside the top-k: no bucket (the teacher's float32
    # log-probabilities, summed, may leave a spurious 1e-7 that the student could not match).
    if tail == "bucket" and ids.shape[-1] < vocabulary_size:
        # log(1 - sum(p)) needs sum(p) to the digits of a small tail: in float64 where
        # the backend has it (float32 resolves the tail's mass to about 1e-7).
        wide = ops.cast(log_probs, _kernels.widest_float())
        teacher_tail = ops.cast(_log1mexp(ops.logsumexp(wide, axis=-1)), log_probs.dtype)
        teacher_tail = temperature * teacher_tail
        student_tail = _complement_log_sum_exp(logits, safe_ids, temperature)
        teacher = ops.concatenate([teacher, teacher_tail[..., None]], axis=-1)
        student = ops.concatenate([student, student_tail[..., None]], axis=-1)
    values = core.divergence_values(divergence, "logits", teacher, student, -1, beta, temperature)
    return ops.where(valid, values, float("nan"))


@keras.saving.register_keras_serializable(package="kl_keras")
class TopKDistillation(_shell.StrictConfig, keras.losses.Loss):
    """Distillation from a teacher's top-k log-probabilities against the student's logits.

    `y_true` holds the teacher's top-k, packed by `pack_top_k` (ids, then their
    log-probabilities at temperature T, shape (..., 2k)); `y_pred` holds the student's
    full logits, (..., V). With P and Q the teacher's and the student's distributions at
    temperature T, the loss per token is T²·D(P' ‖ Q') for one of two ways (`tail`) of
    making distributions of what the top-k give:

    ```python
    # tail="bucket": the top-k plus a (k+1)-th bucket for everything else, on both sides
    P' = [p_1, ..., p_k, 1 - sum(p)]        # log(1 - sum(p)) exact: log1p(-exp(.))
    Q' = [q_1, ..., q_k, 1 - sum(q)]        # q at the teacher's ids; the rest summed directly
    # tail="renormalize": both restricted to the teacher's top-k ids
    P' = p / sum(p),   Q' = q / sum(q)
    ```

    `"bucket"` (TRL's server-side distillation, ModelOpt, DistillKit) keeps the student's
    total mass outside the top-k in the loss: with k = V it is `LogitsDistillation`
    exactly. `"renormalize"` (MaxText, Tunix, axolotl) sees only how the student shares
    its mass among the teacher's top-k ids; what it puts elsewhere is not penalised. The
    bias each costs against the full divergence is measured in the distillation guide.
    The teacher's log(1 - sum(p)) is -inf where its top-k hold all the mass, and teacher
    log-probabilities of -inf are allowed (a masked entry among the top-k). sum(p) is
    taken in float64 where the backend has it (on JAX, with `jax_enable_x64`): in float32
    a tail's mass is resolved to about 1e-8, which for a tail of 1e-5 is 0.1% of it. The
    student's tail is summed over the other entries directly, with nothing to cancel.

    Exactness: `"renormalize"` is the exact core of `LogitsDistillation` over the k
    entries (2e-6 relative also for a student close to its teacher). `"bucket"` adds the
    two tails as float32 logarithms, each rounded on its own: 2e-6 relative where the
    distributions are far apart (2e-5 on JAX without x64), about 1e-4 where their KL is
    1e-7 (1e-3 on JAX without x64).

    `divergence`, `beta` and T² are those of `LogitsDistillation` (the same exact core);
    the teacher's log-probabilities must have been taken at the same temperature
    (`teacher_top_k(..., temperature=T)`). Sample weights (one per token, padding 0) and
    masks as in every Keras loss. A token whose ids are out of [0, V) or repeated raises
    a `ValueError` when the ids are concrete values (eager), and gives NaN inside a
    compiled step.

    Args:
        tail: `"bucket"` or `"renormalize"`.
        temperature: T, a finite number > 0.
        divergence: one of `"kl"`, `"reverse_kl"`, `"jeffreys"`, `"jensen_shannon"`.
        beta: the teacher's weight in the Jensen-Shannon mixture, in [0, 1].
        reduction: as in Keras losses.
        name: name of the loss instance.
        dtype: dtype of the loss's computations, as in Keras losses; float16 and
            bfloat16 logits are computed in float32.

    Example:
        >>> import numpy as np
        >>> teacher_logits = np.array([[3.0, 1.0, 0.0, -1.0]])
        >>> log_p = teacher_logits - np.log(np.exp(teacher_logits).sum())
        >>> ids = np.argsort(-log_p, axis=-1)[:, :2]                     # k = 2
        >>> y_true = pack_top_k(ids, np.take_along_axis(log_p, ids, -1))
        >>> student_logits = np.array([[2.0, 1.5, 0.0, 0.0]])
        >>> loss = TopKDistillation(tail="bucket")
        >>> round(float(loss(y_true, student_logits)), 5)
        0.19783
    """

    def __init__(
        self,
        tail: str = "bucket",
        temperature: float = 1.0,
        divergence: str = "kl",
        beta: float = 0.5,
        reduction: str | None = "sum_over_batch_size",
        name: str | None = "top_k_distillation",
        dtype: str | keras.DTypePolicy | None = None,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.tail = _checks.check_choice("tail", tail, TAILS)
        self.temperature = _checks.check_temperature(temperature)
        self.divergence = _checks.check_choice(
            "divergence", divergence, core.DISTILLATION_DIVERGENCES
        )
        self.beta = _checks.check_beta(beta)
        self._dtype_argument = None if dtype is None else self._dtype_policy.name

    def call(self, y_true: Tensor, y_pred: Tensor) -> Tensor:
        logits = ops.convert_to_tensor(y_pred)
        dtype = core.computation_dtype(logits.dtype)
        ids, log_probs = unpack_top_k(y_true)
        _check_ids_now(ids, int(logits.shape[-1]))
        values = top_k_divergence_values(
            self.divergence,
            ids,
            ops.cast(log_probs, dtype),
            ops.cast(logits, dtype),
            self.tail,
            self.beta,
            self.temperature,
        )
        return ops.cast(
            values, logits.dtype if keras.backend.is_float_dtype(logits.dtype) else dtype
        )

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            {
                "tail": self.tail,
                "temperature": self.temperature,
                "divergence": self.divergence,
                "beta": self.beta,
                "dtype": self._dtype_argument,
            }
        )
        return config


# ---------------------------------------------------------------------------------------
# Writing the teacher's top-k once, and reading it back for training.
# ---------------------------------------------------------------------------------------


def _batches(data: Any, batch_size: int | None) -> Iterator[Any]:
    """The batches of `data`: arrays (or a dict of arrays) cut into `batch_size` rows, or
    whatever an iterable of batches yields (a `tf.data.Dataset`, a `PyDataset`, a list)."""
    if isinstance(data, (np.ndarray, dict)):
        arrays = data if isinstance(data, dict) else {"": data}
        rows = len(next(iter(arrays.values())))
        step = batch_size or 32
        for start in range(0, rows, step):
            batch = {key: np.asarray(a)[start : start + step] for key, a in arrays.items()}
            yield batch if isinstance(data, dict) else batch[""]
        return
    if isinstance(data, keras.utils.PyDataset):
        for i in range(len(data)):
            yield data[i]
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            "Invalid type for argument `data`. Expected a NumPy array, a dict of arrays or an "
            f"iterable of batches. Received: data of type {type(data).__name__}"
        )
    yield from data


def _inputs_and_mask(batch: Any) -> tuple[Any, Any]:
    """The model inputs of a batch, and the padding mask of its tokens (or None)."""
    if isinstance(batch, tuple):
        x = batch[0]
        mask = batch[2] if len(batch) > 2 else None
    else:
        x, mask = batch, None
    if mask is None and isinstance(x, dict) and "padding_mask" in x:
        mask = x["padding_mask"]
    return x, mask


def _numpy_tree(x: Any) -> Any:
    return keras.tree.map_structure(lambda a: np.asarray(ops.convert_to_numpy(a)), x)


def _flat_inputs(x: Any) -> dict[str, np.ndarray]:
    """A batch's inputs as named arrays for a shard (`x` alone, or `x/<key>` for a dict)."""
    if isinstance(x, dict):
        return {f"x/{key}": np.asarray(value) for key, value in x.items()}
    return {"x": np.asarray(x)}


def teacher_top_k(
    teacher: keras.Model,
    data: Any,
    k: int = 64,
    temperature: float = 1.0,
    path: str | os.PathLike | None = None,
    batch_size: int | None = None,
) -> dict[str, Any] | pathlib.Path:
    """Runs a teacher over `data` once and keeps each token's top-k ids and log-probabilities.

    `teacher` maps a batch of inputs to logits of shape (batch, tokens, V) (a KerasHub
    `CausalLM` does) or (batch, V). Each batch's log-probabilities are
    `log_softmax(logits / temperature)` in float32, and the k largest of each token are
    kept, largest first, with their ids (int32). The padding mask comes from the batch's
    sample weights (`(x, y, sample_weight)` batches), else `x["padding_mask"]`, else 1 for
    every token.

    Without `path` the result is returned: a dict of NumPy arrays `"x"` (the inputs, as
    given), `"ids"` (..., k), `"log_probs"` (..., k) and `"mask"`. With `path` each batch
    is written as one shard of a directory that `TopKDataset` reads back, never loading
    more than a shard:

    ```text
    path/index.json             {"format": "kl_keras.top_k/1", "k": ..., "temperature": ...,
                                 "vocabulary_size": ..., "shards": ["shard-00000.npz", ...]}
    path/shard-00000.npz        NumPy .npz: "x" (or "x/<key>" for each input of a dict),
                                "ids" int32 (..., k), "log_probs" float32 (..., k),
                                "mask" float32 (the tokens' shape)
    ```

    Each shard is written to a temporary name and renamed once complete, so a run that
    stops part-way is resumed by calling `teacher_top_k` again with the same data and
    `path`: the shards already there are kept (their batches are read from `data` but
    not run through the teacher), and `index.json` is written last. On disk a token takes
    8k + 4 bytes (516 for k = 64), besides its inputs.

    Args:
        teacher: a Keras model producing logits.
        data: the inputs: a NumPy array or a dict of arrays (cut into `batch_size`
            rows), or an iterable of batches (`x`, or `(x, y, sample_weight)` tuples),
            such as a `tf.data.Dataset` or a `keras.utils.PyDataset`.
        k: the number of tokens kept per token, an int >= 1 (at most V).
        temperature: the teacher's temperature, a finite number > 0 (train with the
            same one).
        path: a directory to write the shards to, or None to return the arrays.
        batch_size: rows per batch (and per shard) when `data` holds arrays; default 32.

    Returns:
        The dict of arrays, or `path` as a `pathlib.Path`.
    """
    k = _checks.check_positive_int("k", k)
    temperature = _checks.check_temperature(temperature)
    if batch_size is not None:
        batch_size = _checks.check_positive_int("batch_size", batch_size)
    directory = None if path is None else pathlib.Path(path)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    shards, parts, vocabulary_size = [], [], None
    for i, batch in enumerate(_batches(data, batch_size)):
        x, mask = _inputs_and_mask(batch)
        name = f"shard-{i:05d}.npz"
        if directory is not None and (directory / name).exists():
            shards.append(name)  # written by an earlier run
            continue
        logits = ops.cast(teacher(x, training=False), "float32")
        vocabulary_size = int(logits.shape[-1])
        if k > vocabulary_size:
            raise ValueError(
                f"Invalid value for argument `k`. Expected at most the teacher's vocabulary, "
                f"{vocabulary_size}. Received: k={k}"
            )
        log_probs, ids = ops.top_k(ops.log_softmax(logits / temperature, axis=-1), k)
        tokens = tuple(logits.shape[:-1])
        mask = np.ones(tokens, "float32") if mask is None else _numpy_tree(mask)
        part = {
            **_flat_inputs(_numpy_tree(x)),
            "ids": np.asarray(ops.convert_to_numpy(ids), "int32"),
            "log_probs": np.asarray(ops.convert_to_numpy(log_probs), "float32"),
            "mask": np.asarray(mask, "float32").reshape(tokens),
        }
        if directory is None:
            parts.append(part)
            continue
        temporary = directory / f".{name}.partial"
        with open(temporary, "wb") as f:  # numpy types savez's **kwds as bool:
            np.savez(f, **part)  # type: ignore[arg-type]
        os.replace(temporary, directory / name)
        shards.append(name)
    if directory is None:
        if not parts:
            raise ValueError("Invalid `data`: it yielded no batch.")
        joined = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        inputs = {key[2:]: value for key, value in joined.items() if key.startswith("x/")}
        return {
            "x": inputs if inputs else joined["x"],
            "ids": joined["ids"],
            "log_probs": joined["log_probs"],
            "mask": joined["mask"],
        }
    index = directory / "index.json"
    previous = json.loads(index.read_text()) if index.exists() else {}
    if vocabulary_size is None:
        vocabulary_size = previous.get("vocabulary_size")
    index.write_text(
        json.dumps(
            {
                "format": FORMAT,
                "k": k,
                "temperature": temperature,
                "vocabulary_size": vocabulary_size,
                "shards": shards,
            },
            indent=1,
        )
    )
    return directory


class TopKDataset(keras.utils.PyDataset):
    """Reads a directory written by `teacher_top_k` back for `fit`, one shard per batch.

    Each item is `(x, y, sample_weight)`: the inputs as they were given to the teacher,
    the packed top-k (`pack_top_k`, shape (..., 2k)) and the padding mask. Only the shard
    of the batch asked for is read, so the directory may be larger than memory. It works
    with `fit`, `evaluate` and `predict` on every backend, with `SequenceDistiller` (no
    teacher) and with a student compiled with `TopKDistillation`; `fit(shuffle=True)`,
    Keras's default, visits the shards in a new order each epoch.

    Args:
        path: the directory (`teacher_top_k(..., path=...)`).
        **kwargs: passed to `keras.utils.PyDataset` (`workers`, `use_multiprocessing`,
            `max_queue_size`).
    """

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = pathlib.Path(path)
        index_path = self.path / "index.json"
        if not index_path.exists():
            raise ValueError(
                f"Invalid `path`: {str(self.path)!r} has no index.json; write it with "
                "kl_keras.distillation.teacher_top_k(..., path=...)."
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(
                f"Invalid `path`: its index.json has format {self.index.get('format')!r}; "
                f"this version reads {FORMAT!r}."
            )
        self.k = int(self.index["k"])
        self.temperature = float(self.index["temperature"])
        self.vocabulary_size = self.index["vocabulary_size"]

    def __len__(self) -> int:
        return len(self.index["shards"])

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray, np.ndarray]:
        with np.load(self.path / self.index["shards"][i]) as shard:
            inputs = {key[2:]: shard[key] for key in shard.files if key.startswith("x/")}
            x = inputs if inputs else shard["x"]
            return x, pack_top_k(shard["ids"], shard["log_probs"]), shard["mask"]
