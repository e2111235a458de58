"""What each backend's engine needs: the faster of two exact forms, and derivative rules.

Everything in kl_keras is `keras.ops`; what differs between backends is which of two
exact forms of the same function is cheaper, and how a closed-form first derivative is
registered with each backend's autodiff (`with_derivatives`). XLA (TensorFlow with
`jit_compile`, JAX) fuses a chain of elementwise ops into one pass; PyTorch runs op by
op, each op a kernel that writes a full-size temporary, so there the fused `log_sigmoid`
kernel (one pass forward, one backward, with forward-mode, second-order and `torch.func`
rules) wins. KL from logits is one form on every backend (the core,
`kl_keras.divergence.log_ratio`), differentiated by its closed form rather than traced
back through the core; so are KL on probabilities, reverse KL and Jeffreys. Measured in
BENCHMARKS.md.

Besides: what an engine does differently with the same `keras.ops` (`read_value` and
`sequential_map`, for TensorFlow's graphs) and what a backend can compute in
(`widest_float`, for JAX without x64).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

from kl_keras._types import Tensor

# (a, b, derivatives) -> (value, d value / d a, d value / d b); the two are None when
# `derivatives` is False. See `with_derivatives`.
ValueAndDerivatives = Callable[[Tensor, Tensor, bool], tuple[Tensor, Any, Any]]


def op_by_op() -> bool:
    """True on PyTorch, whose eager engine runs one kernel per op (see the module docstring)."""
    return keras.backend.backend() == "torch"


def traces_as_fast() -> bool:
    """True on TensorFlow, whose autodiff of KL on probabilities (through the floor and the
    0·log 0 `where`s, under XLA) is faster than a closed-form rule there: 0.77–0.83× Keras's
    loss traced, 0.86–0.92× with the rule, whose forward pass forms and keeps both
    derivatives (BENCHMARKS.md, "Faster than the native peers")."""
    return keras.backend.backend() == "tensorflow"


def read_value(x: Any) -> Tensor:
    """`x` (a tensor or a variable) as a tensor holding its value.

    TensorFlow only: `keras.ops.convert_to_tensor` returns a variable as is, and
    `tf.recompute_grad` (`keras.remat`) treats a variable among its arguments as one the
    function reads, so it would return its gradient twice (once as an argument, once as a
    variable). A read of the value is an ordinary tensor.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(x)
    return ops.convert_to_tensor(x)


def widest_float() -> str:
    """The widest float dtype: float64, or float32 on JAX without `jax_enable_x64` (where a
    cast to float64 gives float32, with a warning)."""
    if keras.backend.backend() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


def sequential_map(f: Callable[[Any], Tensor], xs: Any, dtype: str) -> Tensor:
    """`keras.ops.map(f, xs)` for an `f` that returns a scalar of `dtype`, one element after
    another on every backend.

    TensorFlow only: `tf.map_fn` (Keras's `map`) runs up to 10 iterations at once in a
    graph, each holding its own temporaries: a chunked loss then held about ten chunks
    (measured: 1.40 GB instead of 0.56 GB for chunks of 256 × 32768 logits, and no
    faster on a CPU). JAX's and PyTorch's loops already run one iteration at a time.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.map_fn(f, xs, fn_output_signature=tf.TensorSpec((), dtype), parallel_iterations=1)
    return ops.map(f, xs)


def stored_gradient_sum(
    f: Callable[..., Tensor],
    chunks: Sequence[Tensor],
    params: Sequence[Tensor],
    dtype: str,
    frozen_chunks: Sequence[Tensor] = (),
    frozen_params: Sequence[Tensor] = (),
) -> Tensor:
    """`sum over i of f(*chunks[:, i], *frozen_chunks[:, i], *params, *frozen_params)`,
    each chunk's gradient formed in the forward pass and kept: the backward pass scales
    what was kept, recomputing nothing.

    Chunks are stacked along their first axis (one entry per chunk); `f` returns a scalar
    of `dtype`. The float `chunks` and the `params` are differentiated; the frozen ones are
    data (a teacher, targets), given no gradient and none kept. What is kept is the size
    of what is differentiated: each chunk's gradient (one chunk at a time is computed) and
    the sum of the parameters' gradients. Forward mode raises everywhere; second order
    holds on JAX only (a `custom_vjp`, whose rules JAX differentiates again) and raises on
    TensorFlow (a `custom_gradient` whose gradients refuse to be differentiated) and
    PyTorch (an `autograd.Function` without `jvp` or double backward); vectorising maps
    hold on JAX and TensorFlow (the table of the sequence-distillation guide).
    """
    wanted = [i for i, x in enumerate(chunks) if _is_float(x)]
    trained = len(params)
    every_chunk, every_param = (*chunks, *frozen_chunks), (*params, *frozen_params)
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_stored(f, every_chunk, every_param, dtype, wanted, trained)
    if backend == "torch":
        return _torch_stored().apply(
            f, wanted, trained, len(every_chunk), *every_chunk, *every_param
        )
    return _tensorflow_stored(f, list(every_chunk), list(every_param), dtype, wanted, trained)


def _is_float(x: Any) -> bool:
    return bool(keras.backend.is_float_dtype(keras.backend.standardize_dtype(x.dtype)))


def _jax_stored(
    f: Callable[..., Tensor],
    chunks: tuple[Any, ...],
    params: tuple[Any, ...],
    dtype: str,
    wanted: list[int],
    trained: int,
) -> Any:
    """The stored sum on JAX: `wanted` are the differentiated chunks, `params[:trained]`
    the differentiated parameters."""
    import jax
    import jax.numpy as jnp

    def forward(chunks: tuple[Any, ...], params: tuple[Any, ...]) -> Any:
        frozen = params[trained:]

        def body(carry: Any, chunk: tuple[Any, ...]) -> Any:
            total, param_grads = carry

            def g(differentiable: tuple[Any, ...], trained_params: tuple[Any, ...]) -> Any:
                full = list(chunk)
                for i, x in zip(wanted, differentiable, strict=True):
                    full[i] = x
                return f(*full, *trained_params, *frozen)

            value, vjp = jax.vjp(g, tuple(chunk[i] for i in wanted), params[:trained])
            chunk_grads, new_param_grads = vjp(jnp.ones_like(value))
            param_grads = tuple(a + b for a, b in zip(param_grads, new_param_grads, strict=True))
            return (total + value, param_grads), chunk_grads

        init = (jnp.zeros((), dtype), tuple(jnp.zeros_like(p) for p in params[:trained]))
        (total, param_grads), chunk_grads = jax.lax.scan(body, init, chunks)
        return total, (chunk_grads, param_grads)

    @jax.custom_vjp
    def stored(chunks: tuple[Any, ...], params: tuple[Any, ...]) -> Any:
        return forward(chunks, params)[0]

    def backward(saved: Any, upstream: Any) -> Any:
        chunk_grads, param_grads = saved
        grads: list[Any] = [None] * len(chunks)
        for i, g in zip(wanted, chunk_grads, strict=True):
            grads[i] = upstream * g
        frozen: list[Any] = [None] * (len(params) - trained)
        return tuple(grads), (*(upstream * g for g in param_grads), *frozen)

    stored.defvjp(forward, backward)
    return stored(chunks, params)


@functools.cache
def _torch_stored() -> Any:
    """The `autograd.Function`, defined once on first use (torch is imported only then)."""
    import torch

    class StoredGradient(torch.autograd.Function):
        @staticmethod
        def forward(
            ctx: Any,
            f: Callable[..., Any],
            wanted: list[int],
            trained: int,
            n_chunks: int,
            *inputs: Any,
        ) -> Any:
            chunks, params = inputs[:n_chunks], inputs[n_chunks:]
            params = tuple(
                p.detach().requires_grad_(i < trained and _is_float(p))
                for i, p in enumerate(params)
            )
            total = None
            chunk_grads = [torch.zeros_like(chunks[j]) for j in wanted]
            param_grads = [torch.zeros_like(p) for p in params[:trained]]
            differentiated = [j for j, p in enumerate(params) if p.requires_grad]
            for i in range(chunks[0].shape[0]):
                chunk = [x[i].detach().requires_grad_(j in wanted) for j, x in enumerate(chunks)]
                with torch.enable_grad():
                    value = f(*chunk, *params)
                    inputs_ = [chunk[j] for j in wanted] + [params[j] for j in differentiated]
                    grads = torch.autograd.grad(value, inputs_, allow_unused=True)
                for j, g in enumerate(grads[: len(wanted)]):
                    if g is not None:
                        chunk_grads[j][i] = g
                for j, g in zip(differentiated, grads[len(wanted) :], strict=True):
                    if g is not None:
                        param_grads[j] += g
                total = value.detach() if total is None else total + value.detach()
            ctx.shape = (n_chunks, wanted, len(params) - trained)
            ctx.save_for_backward(*chunk_grads, *param_grads)
            return total

        @staticmethod
        def backward(ctx: Any, upstream: Any) -> Any:
            if torch.is_grad_enabled():  # a double backward (create_graph=True)
                raise RuntimeError(
                    "The stored chunked gradient (backward='stored') has no second "
                    "derivative; use backward='recompute' for higher-order derivatives."
                )
            n_chunks, wanted, frozen = ctx.shape
            saved = ctx.saved_tensors
            grads: list[Any] = [None] * n_chunks
            for j, g in zip(wanted, saved[: len(wanted)], strict=True):
                grads[j] = upstream * g
            grads += [upstream * g for g in saved[len(wanted) :]] + [None] * frozen
            return (None, None, None, None, *grads)

    return StoredGradient


def _tensorflow_stored(
    f: Callable[..., Tensor],
    chunks: list[Any],
    params: list[Any],
    dtype: str,
    wanted: list[int],
    trained: int,
) -> Any:
    import tensorflow as tf

    # What is not differentiated is captured, as tensors (a captured variable would ask
    # custom_gradient for its gradient).
    frozen = [tf.convert_to_tensor(p) for p in params[trained:]]

    @tf.custom_gradient
    def stored(*inputs: Any) -> Any:
        differentiable, params = inputs[: len(wanted)], inputs[len(wanted) :]
        full = list(chunks)
        for i, x in zip(wanted, differentiable, strict=True):
            full[i] = x
        count = tf.shape(full[0])[0]
        chunk_grads = [
            tf.TensorArray(x.dtype, size=count, element_shape=x.shape[1:]) for x in differentiable
        ]

        def body(i: Any, total: Any, param_grads: Any, chunk_grads: Any) -> Any:
            chunk = [x[i] for x in full]
            sources = [chunk[j] for j in wanted] + list(params)
            with tf.GradientTape() as tape:
                tape.watch(sources)
                value = f(*chunk, *params, *frozen)
            grads = tape.gradient(
                value, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            new_chunk_grads = [a.write(i, g) for a, g in zip(chunk_grads, grads, strict=False)]
            param_grads = [a + g for a, g in zip(param_grads, grads[len(wanted) :], strict=True)]
            return i + 1, total + value, param_grads, new_chunk_grads

        init_total = tf.zeros((), dtype)
        _, total, param_grads, chunk_grads = tf.while_loop(
            lambda i, *_: i < count,
            body,
            (0, init_total, [tf.zeros_like(p) for p in params], chunk_grads),
            parallel_iterations=1,
        )
        chunk_grads = [a.stack() for a in chunk_grads]

        def gradient(upstream: Any) -> Any:
            # What was kept has no derivative: differentiating it again must raise, not
            # give a silent 0 (a nested tape, ForwardAccumulator).
            grads = [upstream * g for g in (*chunk_grads, *param_grads)]
            message = "the stored chunked gradient has no second derivative"
            return [tf.raw_ops.PreventGradient(input=g, message=message) for g in grads]

        return total, gradient

    return stored(*(chunks[i] for i in wanted), *params[:trained])


def log_sigmoids(logits: Tensor) -> tuple[Tensor, Tensor]:
    """`(log_sigmoid(logits), log_sigmoid(-logits))`, each exact with its derivatives at 0.

    PyTorch: two fused `log_sigmoid` kernels. XLA: both from one `log1p(exp(-|z|))`,
    `log_sigmoid(z) = min(z, 0) - log1p(exp(-|z|))` and `log_sigmoid(-z) = -relu(z) -
    log1p(exp(-|z|))`, where `-|z|` and `min(z, 0)` are `where`s that take the `z <= 0`
    branch at 0, and every backend gives `relu` the derivative 0 there, so every
    derivative is that of the smooth function, at 0 as well (`sigmoid(0) = 0.5`, tested);
    `z = +inf` and `z = -inf` give 0 and -inf as they should.
    """
    if op_by_op():
        return ops.log_sigmoid(logits), ops.log_sigmoid(-logits)
    positive = logits > 0
    softplus_of_negative_abs = ops.log1p(ops.exp(ops.where(positive, -logits, logits)))
    log_on = ops.where(positive, 0.0, logits) - softplus_of_negative_abs
    return log_on, -ops.relu(logits) - softplus_of_negative_abs


def with_derivatives(
    function: ValueAndDerivatives, a: Tensor, b: Tensor, axis: int, exact_zeros: bool = False
) -> Tensor:
    """`function(a, b, False)[0]`, a value per row, whose first derivatives are the closed
    forms that `function(a, b, True)` gives, in every autodiff mode.

    `function` returns the value with `axis` kept and, when asked, its derivatives with
    respect to each entry of `a` and of `b` (their shape, which must be the same). The
    backend's autodiff never traces the value itself: reverse mode multiplies the
    derivatives by the cotangent of each row, forward mode sums them against the tangents,
    and second order differentiates `function`'s derivatives with the backend's own
    autodiff (so a closed form must itself be differentiable, as `keras.ops` are).
    Vectorising maps see the same rule. With `exact_zeros`, an entry of `b` (the
    prediction) whose derivative is exactly 0 (one the value does not depend on, as where a
    probability target is 0) gets a derivative of 0 whatever the cotangent, NaN included, as
    a `where` traced by the backend would give it. Each backend registers the rule with its
    own engine: a JAX `custom_jvp` (a symbolic zero tangent, an argument that is not
    differentiated, leaves its derivative out); a PyTorch `autograd.Function` (forward AD,
    double backward, `torch.func`; a double backward recomputes the derivatives from the
    inputs; the backward forms only the gradients asked for); a TensorFlow
    `custom_gradient` (a tape around the first one records the ops that compute the
    derivatives, so nested tapes see them as functions of the inputs, eagerly, in
    `tf.function` and under XLA; `ForwardAccumulator` does not use the rule, it
    differentiates the forward ops).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_rule(function, axis, exact_zeros)(a, b)
    if backend == "torch":
        return _torch_rule().apply(a, b, function, axis, exact_zeros)[0]
    if backend == "tensorflow":
        return _tensorflow_rule(function, a, b, exact_zeros)
    return function(a, b, False)[0]  # pragma: no cover - another backend's own autodiff


def _times(derivative: Tensor, factor: Tensor, exact_zeros: bool) -> Tensor:
    """`derivative * factor`; with `exact_zeros`, 0 wherever `derivative` is 0."""
    if exact_zeros:
        factor = ops.where(derivative == 0, 0.0, factor)
    return derivative * factor


def _jax_rule(function: ValueAndDerivatives, axis: int, exact_zeros: bool) -> Any:
    import jax

    @jax.custom_jvp
    def value(a: Tensor, b: Tensor) -> Tensor:
        return function(a, b, False)[0]

    def value_jvp(primals: Any, tangents: Any) -> Any:
        a, b = primals
        result, d_a, d_b = function(a, b, True)
        # An argument that is not differentiated (a teacher, a target) has a symbolic zero
        # tangent: its term is left out, and XLA drops the derivative that would feed it.
        tangent = None
        for derivative, t, zeros in ((d_a, tangents[0], False), (d_b, tangents[1], exact_zeros)):
            if not isinstance(t, jax.custom_derivatives.SymbolicZero):
                term = _times(derivative, t, zeros)
                tangent = term if tangent is None else tangent + term
        if tangent is None:
            return result, ops.zeros_like(result)
        return result, ops.sum(tangent, axis=axis, keepdims=True)

    value.defjvp(value_jvp, symbolic_zeros=True)

    return value


def _tensorflow_rule(
    function: ValueAndDerivatives, a: Tensor, b: Tensor, exact_zeros: bool
) -> Tensor:
    import tensorflow as tf

    @tf.custom_gradient
    def value(a: Tensor, b: Tensor) -> Any:
        result, d_a, d_b = function(a, b, True)

        def gradient(upstream: Tensor) -> tuple[Tensor, Tensor]:
            return upstream * d_a, _times(d_b, upstream, exact_zeros)

        return result, gradient

    return value(a, b)


@functools.cache
def _torch_rule() -> Any:
    """The `autograd.Function`, defined once on first use (torch is imported only then)."""
    import torch

    class WithDerivatives(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(
            a: Any, b: Any, function: ValueAndDerivatives, axis: int, exact_zeros: bool
        ) -> Any:
            return function(a, b, True)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            a, b, function, axis, exact_zeros = inputs
            _, d_a, d_b = output
            ctx.function, ctx.axis, ctx.exact_zeros = function, axis, exact_zeros
            ctx.mark_non_differentiable(d_a, d_b)
            ctx.save_for_backward(a, b, d_a, d_b)
            ctx.save_for_forward(d_a, d_b)

        @staticmethod
        def backward(ctx: Any, upstream: Any, *_: Any) -> Any:
            a, b, d_a, d_b = ctx.saved_tensors
            if torch.is_grad_enabled():
                # A double backward (create_graph=True): the derivatives as functions of
                # the inputs, so that they are differentiated in turn.
                _, d_a, d_b = ctx.function(a, b, True)
            need_a, need_b = ctx.needs_input_grad[:2]
            d_a = upstream * d_a if need_a else None
            d_b = _times(d_b, upstream, ctx.exact_zeros) if need_b else None
            return d_a, d_b, None, None, None

        @staticmethod
        def jvp(ctx: Any, tangent_a: Any, tangent_b: Any, *_: Any) -> Any:
            d_a, d_b = ctx.saved_tensors
            total: Any = 0.0
            for derivative, tangent, zeros in ((d_a, tangent_a, False), (d_b, tangent_b, True)):
                if tangent is not None:
                    product = _times(derivative, tangent, zeros and ctx.exact_zeros)
                    total = total + torch.sum(product, dim=ctx.axis, keepdim=True)
            return total, None, None

    return WithDerivatives
