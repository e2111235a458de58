"""Distillation at language-model scale: from hidden states and an output projection, chunk
by chunk, never holding the full logits; `SequenceDistiller`, the model that trains on it."""

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops

from kl_keras import _checks, _chunked, _distribute, _kernels
from kl_keras import divergence as core
from kl_keras._types import Config, Tensor
from kl_keras.distillation import top_k as top_k_module


class _VariableReads(keras.StatelessScope):
    """Records the Keras variables read inside it; every read sees the enclosing scope."""

    def __init__(self) -> None:
        super().__init__()
        self.read: dict[int, keras.Variable] = {}

    def get_current_value(self, variable: keras.Variable) -> Any:
        self.read.setdefault(id(variable), variable)
        outer = self.original_scope
        return None if outer is None else outer.get_current_value(variable)


class _Head(NamedTuple):
    """An output projection: `logits(rows, *params)` gives (n, V) float logits.

    Every tensor the head needs is one of `params`, an explicit argument of each chunk
    (see `_chunked.token_mean`); a callable's Keras variables are found by calling it once and
    bound to their values with a `keras.StatelessScope` inside the chunk.
    """

    logits: Callable[..., Tensor]
    params: tuple[Tensor, ...]
    vocabulary_size: int


def _projection_head(name: str, head: Any, hidden_size: int, dtype: str) -> _Head:
    if callable(head) and not isinstance(head, keras.Variable):
        probe = ops.zeros((1, hidden_size), dtype)
        with _VariableReads() as reads:
            probe_logits = head(probe)
        variables = tuple(reads.read.values())
        if len(probe_logits.shape) != 2 or probe_logits.shape[0] != 1:
            raise ValueError(
                f"Invalid `{name}`: a callable head must map (n, {hidden_size}) hidden states "
                f"to (n, vocabulary) logits. Received logits of shape "
                f"{tuple(probe_logits.shape)} for a (1, {hidden_size}) input."
            )

        def call(rows: Tensor, *values: Tensor) -> Tensor:
            with keras.StatelessScope(list(zip(variables, values, strict=True))):
                return ops.cast(head(rows), dtype)

        params = tuple(_kernels.read_value(v) for v in variables)
        return _Head(call, params, int(probe_logits.shape[1]))
    parts = tuple(head) if isinstance(head, (tuple, list)) else (head,)
    if len(parts) not in (1, 2):
        raise ValueError(
            f"Invalid `{name}`: expected a kernel of shape (hidden, vocabulary), a "
            f"(kernel, bias) pair or a callable. Received a sequence of {len(parts)} items."
        )
    params = tuple(ops.cast(_kernels.read_value(x), dtype) for x in parts)
    kernel = params[0]
    if len(kernel.shape) != 2 or kernel.shape[0] != hidden_size:
        raise ValueError(
            f"Invalid `{name}`: its kernel must have shape ({hidden_size}, vocabulary), "
            f"{hidden_size} being the hidden states' last axis. Received a kernel of shape "
            f"{tuple(kernel.shape)}."
        )
    vocabulary_size = int(kernel.shape[1])
    if len(params) == 2 and tuple(params[1].shape) != (vocabulary_size,):
        raise ValueError(
            f"Invalid `{name}`: its bias must have shape ({vocabulary_size},). Received a "
            f"bias of shape {tuple(params[1].shape)}."
        )

    def project(rows: Tensor, *values: Tensor) -> Tensor:
        # einsum, not matmul: Keras's PyTorch matmul returns float32 for float64 inputs.
        logits = ops.einsum("nh,hv->nv", ops.cast(rows, dtype), values[0])
        return logits + values[1] if len(values) == 2 else logits

    return _Head(project, params, vocabulary_size)


def sequence_distillation_loss(
    student_hidden: Tensor,
    student_head: Any,
    teacher: Any,
    mask: Tensor | None = None,
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    backward: str = "stored",
) -> Tensor:
    """Mean distillation loss over real tokens, from hidden states: no full logits in memory.

    The loss of `LogitsDistillation` at language-model scale. The student's logits are
    `student_head(student_hidden)`, but they are never formed whole: the tokens are taken
    `chunk_size` rows at a time, each chunk's logits (the student's and, from hidden
    states, the teacher's) live only inside that chunk, and the backward pass computes
    them again (`keras.remat`). Memory grows with `chunk_size · V`, not with the number
    of tokens `N · V` (one float32 (16384, 262144) logits tensor is 17.2 GB).

    ```python
    w = mask                                    # (B, T): 0 for padding, or token weights
    P = softmax(teacher_logits / temperature)   # no gradient reaches the teacher
    Q = softmax(student_head(student_hidden) / temperature)
    loss = sum(w * temperature**2 * D(P ‖ Q)) / sum(w)    # the mean over real tokens
    ```

    `D`, `beta` and the T² factor are those of `LogitsDistillation`, with its exact forms
    (relative error below 2e-6 in float32 also where P and Q are close). The mean is over
    the tokens whose weight is not 0: padding neither adds to the sum nor counts, and its
    hidden states are never read (NaN there changes nothing); when every weight is 0 the
    loss is 0 with zero gradients. A NaN hidden state of a real token gives a NaN loss
    and NaN gradients. Under `tf.distribute` both sums are over the global batch (every
    replica returns the global mean); a Keras `compute_loss` divides it by the number of
    replicas, as Keras's losses do (`SequenceDistiller` does). Under JAX's
    `keras.distribution` the program already sees the global batch.

    Precision: each chunk is computed in float32 from bfloat16 and float16 inputs (a
    kernel head casts the hidden states and its kernel; a callable head computes in its
    own dtype and its logits are cast), in float64 from float64; the result has that dtype.

    Gradients (`backward`): `"stored"` (the default) forms each chunk's gradient in the
    forward pass and keeps it (the size of the hidden states and the head), so the
    backward pass recomputes nothing: about the time of the dense computation.
    `"recompute"` keeps only each chunk's inputs and computes the chunk again in the
    backward pass (`keras.remat`): one more forward pass, about 1.5 times the time, and
    the most autodiff modes. Reverse mode on every backend with either; the other modes of each
    backend and form are listed in the sequence-distillation guide (with `"recompute"`,
    JAX has every mode).

    Args:
        student_hidden: the student's last hidden states, (B, T, H) or (N, H).
        student_head: the student's output projection: a kernel of shape (H, V), a
            `(kernel, bias)` pair, or a callable mapping (n, H) hidden states to (n, V)
            logits, such as a KerasHub backbone's
            `lambda h: backbone.token_embedding(h, reverse=True)` or a `Dense` layer (the
            Keras variables it reads are found by calling it once on one row).
        teacher: the teacher's logits, (B, T, V) or (N, V), or a pair
            `(teacher_hidden, teacher_head)` in the same forms as the student's.
        mask: padding mask or token weights, (B, T) or (N,); None weighs every token 1.
        divergence: one of `"kl"`, `"reverse_kl"`, `"jeffreys"`, `"jensen_shannon"`.
        beta: the teacher's weight in the Jensen-Shannon mixture, in [0, 1].
        temperature: T, a finite number > 0.
        chunk_size: the number of tokens per chunk, an int >= 1.
        backward: `"stored"` or `"recompute"`, how the gradient is formed (above).

    Returns:
        A scalar.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> hidden = rng.normal(size=(2, 5, 8)).astype("float32")
        >>> kernel = rng.normal(size=(8, 11)).astype("float32")
        >>> teacher = rng.normal(size=(2, 5, 11)).astype("float32")
        >>> mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], "float32")
        >>> loss = sequence_distillation_loss(hidden, kernel, teacher, mask, chunk_size=3)
        >>> from kl_keras import LogitsDistillation
        >>> dense = LogitsDistillation()(teacher, hidden @ kernel, sample_weight=mask)
        >>> # Keras divides by all 10 tokens, this loss by the 8 real ones
        >>> round(float(loss), 4) == round(float(dense) * 10 / 8, 4)
        True
    """
    divergence = _checks.check_choice("divergence", divergence, core.DISTILLATION_DIVERGENCES)
    beta = _checks.check_beta(beta)
    temperature = _checks.check_temperature(temperature)
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    backward = _checks.check_choice("backward", backward, _chunked.BACKWARDS)
    rows, leading, dtype = _hidden_rows(student_hidden)
    student = _projection_head("student_head", student_head, rows.shape[-1], dtype)
    if isinstance(teacher, (tuple, list)):
        if len(teacher) != 2:
            raise ValueError(
                "Invalid `teacher`: expected logits or a (teacher_hidden, teacher_head) "
                f"pair. Received a sequence of {len(teacher)} items."
            )
        teacher_rows = _chunked.rows(teacher[0], leading, "teacher_hidden", teacher[0].shape[-1])
        teacher_head = _projection_head("teacher_head", teacher[1], teacher_rows.shape[-1], dtype)
        vocabulary_size = teacher_head.vocabulary_size
    else:
        teacher_rows = ops.cast(
            _chunked.rows(teacher, leading, "teacher", student.vocabulary_size), dtype
        )
        teacher_head, vocabulary_size = None, teacher_rows.shape[-1]
    if vocabulary_size != student.vocabulary_size:
        raise ValueError(
            "The teacher and the student have different vocabulary sizes: teacher "
            f"{vocabulary_size}, student {student.vocabulary_size}."
        )
    weights = _chunked.token_weights(mask, leading, ops.shape(rows)[:1], dtype)
    teacher_params = () if teacher_head is None else teacher_head.params
    n_student = len(student.params)

    def per_token(student_rows: Tensor, chunk_teacher: Tensor, *params: Tensor) -> Tensor:
        logits = student.logits(student_rows, *params[:n_student])
        if teacher_head is not None:
            chunk_teacher = teacher_head.logits(chunk_teacher, *params[n_student:])
        return core.divergence_values(
            divergence, "logits", ops.stop_gradient(chunk_teacher), logits, -1, beta, temperature
        )

    return _chunked.token_mean(
        per_token,
        (rows, teacher_rows),
        weights,
        student.params,
        chunk_size,
        backward,
        frozen_params=teacher_params,
    )


def sequence_top_k_distillation_loss(
    student_hidden: Tensor,
    student_head: Any,
    top_k: Tensor,
    mask: Tensor | None = None,
    tail: str = "bucket",
    divergence: str = "kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    backward: str = "stored",
) -> Tensor:
    """`sequence_distillation_loss` from a teacher's stored top-k instead of its logits.

    The loss of `TopKDistillation` (the teacher's top-k, packed by `pack_top_k`, against
    the student's logits, with a tail bucket or renormalised) at language-model scale: the
    student's logits are formed `chunk_size` tokens at a time from its hidden states and
    head, never whole, and the result is the mean over real tokens, as in
    `sequence_distillation_loss`. Neither model's full logits ever exist.

    ```python
    loss = sum(w * T**2 * D(P' ‖ Q')) / sum(w)   # P', Q' as in TopKDistillation
    ```

    Args:
        student_hidden: the student's last hidden states, (B, T, H) or (N, H).
        student_head: its output projection, in the forms of `sequence_distillation_loss`.
        top_k: the teacher's packed top-k, (B, T, 2k) or (N, 2k).
        mask: padding mask or token weights, (B, T) or (N,).
        tail: `"bucket"` or `"renormalize"` (see `TopKDistillation`).
        divergence: one of `"kl"`, `"reverse_kl"`, `"jeffreys"`, `"jensen_shannon"`.
        beta: the teacher's weight in the Jensen-Shannon mixture, in [0, 1].
        temperature: T, the one the top-k were taken at.
        chunk_size: the number of tokens per chunk, an int >= 1.
        backward: as in `sequence_distillation_loss`.

    Returns:
        A scalar.
    """
    tail = _checks.check_choice("tail", tail, top_k_module.TAILS)
    divergence = _checks.check_choice("divergence", divergence, core.DISTILLATION_DIVERGENCES)
    beta = _checks.check_beta(beta)
    temperature = _checks.check_temperature(temperature)
    chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
    backward = _checks.check_choice("backward", backward, _chunked.BACKWARDS)
    rows, leading, dtype = _hidden_rows(student_hidden)
    student = _projection_head("student_head", student_head, rows.shape[-1], dtype)
    top_k = ops.convert_to_tensor(top_k)
    targets = _chunked.rows(top_k, leading, "top_k", top_k.shape[-1])
    ids, _ = top_k_module.unpack_top_k(targets)  # checks the packing
    weights = _chunked.token_weights(mask, leading, ops.shape(rows)[:1], dtype)
    top_k_module._check_ids_now(ids, student.vocabulary_size, weights)

    def per_token(student_rows: Tensor, chunk_targets: Tensor, *params: Tensor) -> Tensor:
        logits = student.logits(student_rows, *params)
        chunk_ids, log_probs = top_k_module.unpack_top_k(chunk_targets)
        return top_k_module.top_k_divergence_values(
            divergence, chunk_ids, ops.cast(log_probs, dtype), logits, tail, beta, temperature
        )

    return _chunked.token_mean(
        per_token, (rows, targets), weights, student.params, chunk_size, backward
    )


def _hidden_rows(student_hidden: Tensor) -> tuple[Tensor, tuple[Any, ...], str]:
    """(the hidden states as rows, their leading shape, the computation dtype)."""
    hidden = ops.convert_to_tensor(student_hidden)
    if len(hidden.shape) not in (2, 3) or hidden.shape[-1] is None:
        raise ValueError(
            "Invalid `student_hidden`: expected hidden states of shape (batch, sequence, "
            f"hidden) or (tokens, hidden). Received shape {tuple(hidden.shape)}."
        )
    dtype = core.computation_dtype(keras.backend.standardize_dtype(hidden.dtype))
    return ops.reshape(hidden, (-1, hidden.shape[-1])), tuple(hidden.shape[:-1]), dtype


def _sequence_cross_entropy(
    hidden: Tensor, head: _Head, labels: Tensor, weights: Tensor, chunk_size: int, backward: str
) -> Tensor:
    """The mean next-token cross-entropy over real tokens, in chunks like the loss above."""

    def per_token(rows: Tensor, chunk_labels: Tensor, *params: Tensor) -> Tensor:
        logits = head.logits(rows, *params)
        picked = ops.take_along_axis(logits, ops.cast(chunk_labels, "int32")[:, None], axis=-1)
        return ops.logsumexp(logits, axis=-1) - picked[:, 0]

    rows = ops.reshape(hidden, (-1, hidden.shape[-1]))
    return _chunked.token_mean(
        per_token, (rows, ops.reshape(labels, (-1,))), weights, head.params, chunk_size, backward
    )


def _split(name: str, model: keras.Model) -> tuple[keras.Model, Any, int]:
    """(the model of its hidden states, its head, its vocabulary size) of a sequence model."""
    backbone = getattr(model, "backbone", None)
    embedding = getattr(backbone, "token_embedding", None)
    if backbone is not None and embedding is not None:  # a KerasHub CausalLM

        def head(h: Tensor) -> Tensor:
            return embedding(h, reverse=True)

        return backbone, head, int(embedding.input_dim)
    last = model.layers[-1] if getattr(model, "layers", None) else None
    if isinstance(last, keras.layers.Dense) and last.activation is keras.activations.linear:
        # A Sequential model has one input and is never called itself (no `model.input`).
        inputs = model.inputs[0] if isinstance(model, keras.Sequential) else model.input
        hidden = keras.Model(inputs, last.input)
        return hidden, last, int(last.units)
    raise ValueError(
        f"Invalid `{name}`: expected a KerasHub CausalLM (a `backbone` with a "
        "`token_embedding`) or a built functional or Sequential model whose last layer is "
        f"a Dense layer without activation (its logits). Received: {name}={model!r}"
    )


@keras.saving.register_keras_serializable(package="kl_keras")
class SequenceDistiller(keras.Model):
    """Distills one sequence model into another, token by token, without full logits.

    `compile` / `fit` / `evaluate` train the student on
    `sequence_distillation_loss` (the mean over real tokens of
    T²·D(teacher ‖ student), chunk by chunk), optionally plus
    `student_loss_weight` times its own next-token cross-entropy (also
    chunked; default 0: distillation alone). The teacher is frozen.

    ```python
    loss = sequence_distillation_loss(h_student, head_student, (h_teacher, head_teacher),
                                      mask, divergence, beta, temperature, chunk_size)
    loss += student_loss_weight * mean_cross_entropy(head_student(h_student), y, mask)
    ```

    How each model is split into hidden states and head:
    a KerasHub `CausalLM` gives `model.backbone(x)` and
    `backbone.token_embedding(h, reverse=True)` (tied embeddings and any soft-cap
    applied by the layer); any other built functional or Sequential model must end
    in a `Dense` layer without activation, which is the head, and the rest
    (`keras.Model(model.input, last_dense.input)`) gives the hidden states.

    Data: as KerasHub preprocessors produce it, `x` (a dict with `token_ids` and
    `padding_mask`, or any input of the models), `y` (next-token ids, used only
    when `student_loss_weight > 0`; Keras passes `sample_weight` on only with a `y`)
    and `sample_weight`. The token weights are `sample_weight` when given, else
    `x["padding_mask"]`, else 1 for every token.

    Offline, from a teacher's stored top-k: `teacher=None`, and `y` holds the
    teacher's packed top-k (`kl_keras.distillation.TopKDataset` yields them with
    the inputs and the padding mask); the loss is then
    `sequence_top_k_distillation_loss` with `tail`, and neither model's full logits
    exist.

    `call` returns the student's last hidden states (what the loss takes); the
    student's logits are `distiller.student(x)`. Logged: `loss`,
    `distillation_loss` (the mean over the epoch's real tokens) and `tokens` (the
    number of real tokens seen in the epoch).

    Args:
        teacher: the teacher model (frozen here), or None to train on its stored
            top-k.
        student: the student model.
        divergence: as in `sequence_distillation_loss`.
        beta: as in `sequence_distillation_loss`.
        temperature: as in `sequence_distillation_loss`.
        chunk_size: as in `sequence_distillation_loss`.
        student_loss_weight: weight of the student's own cross-entropy, >= 0.
        vocabulary_size: the number of leading vocabulary entries compared when the
            two models' vocabularies differ in size (padded vocabularies); None
            requires equal sizes.
        tail: without a teacher, how the mass outside the top-k is handled:
            `"bucket"` or `"renormalize"` (see `TopKDistillation`).
        backward: as in `sequence_distillation_loss`.
        **kwargs: passed to `keras.Model` (`name`, ...).
    """

    def __init__(
        self,
        teacher: keras.Model | None,
        student: keras.Model,
        divergence: str = "kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        student_loss_weight: float = 0.0,
        vocabulary_size: int | None = None,
        tail: str = "bucket",
        backward: str = "stored",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.divergence = _checks.check_choice(
            "divergence", divergence, core.DISTILLATION_DIVERGENCES
        )
        self.beta = _checks.check_beta(beta)
        self.temperature = _checks.check_temperature(temperature)
        self.chunk_size = _checks.check_positive_int("chunk_size", chunk_size)
        self.student_loss_weight = _checks.check_weight("student_loss_weight", student_loss_weight)
        self.tail = _checks.check_choice("tail", tail, top_k_module.TAILS)
        self.backward = _checks.check_choice("backward", backward, _chunked.BACKWARDS)
        self.teacher, self.student = teacher, student
        self._student_hidden, student_head, student_size = _split("student", student)
        if teacher is None:  # the teacher's top-k come as `y`
            if student_loss_weight > 0:
                raise ValueError(
                    "Invalid value for argument `student_loss_weight`. Without a teacher, `y` "
                    "holds the teacher's top-k, not next-token labels: expected 0. Received: "
                    f"student_loss_weight={student_loss_weight}"
                )
            teacher_size = student_size if vocabulary_size is None else vocabulary_size
            self._teacher_hidden, teacher_head = None, None
        else:
            teacher.trainable = False
            self._teacher_hidden, teacher_head, teacher_size = _split("teacher", teacher)
        if vocabulary_size is None:
            if teacher_size != student_size:
                raise ValueError(
                    "The teacher and the student have different vocabulary sizes: teacher "
                    f"{teacher_size}, student {student_size}. Pass `vocabulary_size=n` to "
                    "compare the first n entries of each (padded vocabularies)."
                )
        else:
            vocabulary_size = _checks.check_positive_int("vocabulary_size", vocabulary_size)
            if vocabulary_size > min(teacher_size, student_size):
                raise ValueError(
                    "Invalid value for argument `vocabulary_size`. Expected at most the "
                    f"smaller vocabulary (teacher {teacher_size}, student {student_size}). "
                    f"Received: vocabulary_size={vocabulary_size}"
                )
            if teacher_head is not None:
                teacher_head = _leading_entries(teacher_head, vocabulary_size)
            student_head = _leading_entries(student_head, vocabulary_size)
        self.vocabulary_size = vocabulary_size
        self._teacher_head, self._student_head = teacher_head, student_head
        self.distillation_tracker = keras.metrics.Mean(name="distillation_loss")
        self.token_counter = keras.metrics.Sum(name="tokens")

    def call(self, inputs: Any, training: bool | None = None) -> Tensor:
        return self._student_hidden(inputs, training=training)

    def compute_loss(
        self,
        x: Any = None,
        y: Any = None,
        y_pred: Any = None,
        sample_weight: Any = None,
        training: bool | None = True,
    ) -> Tensor:
        hidden = self(x, training=training) if y_pred is None else y_pred
        if sample_weight is None and isinstance(x, dict) and "padding_mask" in x:
            sample_weight = x["padding_mask"]
        if self._teacher_hidden is None:
            if y is None:
                raise ValueError(
                    "A SequenceDistiller without a teacher trains on the teacher's top-k: "
                    "pass them as `y` (kl_keras.distillation.pack_top_k, or a TopKDataset)."
                )
            loss = sequence_top_k_distillation_loss(
                hidden,
                self._student_head,
                y,
                sample_weight,
                self.tail,
                self.divergence,
                self.beta,
                self.temperature,
                self.chunk_size,
                self.backward,
            )
        else:
            teacher_hidden = ops.stop_gradient(self._teacher_hidden(x, training=False))
            loss = sequence_distillation_loss(
                hidden,
                self._student_head,
                (teacher_hidden, self._teacher_head),
                sample_weight,
                self.divergence,
                self.beta,
                self.temperature,
                self.chunk_size,
                self.backward,
            )
        weights = _chunked.token_weights(
            sample_weight, tuple(hidden.shape[:-1]), ops.shape(hidden)[:-1], "float32"
        )
        # This replica's tokens: under tf.distribute the metrics sum over replicas.
        tokens = ops.sum(ops.cast(weights > 0, "float32"))
        self.distillation_tracker.update_state(loss, sample_weight=tokens)
        self.token_counter.update_state(tokens)
        total = loss
        if self.student_loss_weight > 0:
            head = _projection_head(
                "student",
                self._student_head,
                hidden.shape[-1],
                core.computation_dtype(keras.backend.standardize_dtype(hidden.dtype)),
            )
            cross_entropy = _sequence_cross_entropy(
                hidden, head, y, ops.reshape(weights, (-1,)), self.chunk_size, self.backward
            )
            total = total + self.student_loss_weight * cross_entropy
        return _distribute.per_replica(total)

    def get_config(self) -> Config:
        config = super().get_config()
        config.update(
            {
                "teacher": None
                if self.teacher is None
                else keras.saving.serialize_keras_object(self.teacher),
                "student": keras.saving.serialize_keras_object(self.student),
                "divergence": self.divergence,
                "beta": self.beta,
                "temperature": self.temperature,
                "chunk_size": self.chunk_size,
                "student_loss_weight": self.student_loss_weight,
                "vocabulary_size": self.vocabulary_size,
                "tail": self.tail,
                "backward": self.backward,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: Config) -> "SequenceDistiller":
        config = dict(config)
        for key in ("teacher", "student"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def _leading_entries(head: Any, n: int) -> Callable[[Tensor], Tensor]:
    def first_n(h: Tensor) -> Tensor:
        return head(h)[:, :n]

    return first_n
