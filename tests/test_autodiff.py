"""Every divergence, in every autodiff mode, on every backend, against float64 references.

Modes: values; reverse mode (gradients); forward mode (Jacobian-vector products);
second order (Hessian-vector products, reverse-over-reverse and forward-over-reverse,
alone and inside a larger objective `sum(f(x)) + 0.5 * ||x||^2`); and vectorising
maps (`jax.vmap`, `torch.func.vmap`, `tf.vectorized_map`) of values and of
per-example gradients. Each is compared with float64 central differences of a numpy
reference, so a mode that drops a term (a custom gradient without a second
derivative) fails here.

A new divergence joins by adding one entry to `CASES`.
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, to_numpy
from scipy.special import softmax

import kl_keras
from kl_keras.distillation import sequence_distillation_loss

RTOL, ATOL = 1e-5, 2e-6  # against float64; ATOL is scaled by the largest entry (float32
# rounding where an entry of v + H·v cancels to far below the others)


@dataclass
class Case:
    fn: Callable  # (*tensors) -> tensor: what the library computes
    reference: Callable  # (*float64 arrays) -> array: the same in numpy
    inputs: Callable  # (rng) -> list of float32 arrays, leading axis mapped by vmap
    # backend -> the modes its engine refuses for this case (stated in the docs); each of
    # them is tested to raise, so a mode that starts working is noticed
    unsupported: dict = field(default_factory=dict)
    curved: bool = True  # False where every second derivative is 0 (k1, abs)


def in_mode(case, mode):
    """A context: the mode must work, or raise where `case.unsupported` says it does."""
    if mode in case.unsupported.get(BACKEND, ()):
        # LookupError: TensorFlow's refusal to differentiate a gradient it was told has none.
        return pytest.raises(
            (NotImplementedError, RuntimeError, TypeError, ValueError, LookupError)
        )
    return contextlib.nullcontext()


def probabilities(rng, shape, low=0.02):
    """Rows of probabilities with every entry >= low (so central differences stay valid)."""
    x = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
    return ((1 - low * shape[-1]) * x + low).astype("float32")


def reference_sampling_loss(mean, log_var, beta=0.7, free_bits=0.05):
    kl = 0.5 * (np.expm1(log_var) - log_var + mean**2)
    return beta * np.sum(np.maximum(kl.mean(axis=0), free_bits))


def added_loss(layer, *shapes):
    """`(*tensors) -> the loss a built `layer` adds when called on them` (not training)."""
    layer.build(list(shapes) if len(shapes) > 1 else shapes[0])

    def loss(*inputs):
        layer(list(inputs) if len(inputs) > 1 else inputs[0])
        return layer.losses[0]

    return loss


def two_logits(rng):
    # Unit-scale logits: with larger values the reference H·v (nested float64 central
    # differences) loses digits to rounding before float32 does.
    return [rng.normal(size=(2, 3, 4)).astype("float32") for _ in range(2)]


def close_logits(rng):
    # Distributions near each other (KL about 1e-4), where the centred core is used.
    teacher = rng.normal(size=(2, 3, 4))
    return [
        teacher.astype("float32"),
        (teacher + 0.02 * rng.normal(size=(2, 3, 4))).astype("float32"),
    ]


def close_probabilities(rng):
    p = probabilities(rng, (2, 3, 4))
    q = p * np.exp(0.02 * rng.normal(size=p.shape))
    return [p, (q / q.sum(-1, keepdims=True)).astype("float32")]


def probs(rng):
    return [probabilities(rng, (2, 3, 4)), probabilities(rng, (2, 3, 4))]


def logits(rng):
    return [probabilities(rng, (2, 3, 4)), rng.normal(size=(2, 3, 4)).astype("float32")]


def binary(rng):
    return [rng.uniform(0.05, 0.95, size=(2, 3, 4)).astype("float32") for _ in range(2)]


def family(name, function, beta=None):
    """The probabilities and the logits case of one divergence of the family."""
    kwargs = {} if beta is None else {"beta": beta}
    return {
        f"{function.__name__} probabilities": Case(
            lambda p, q: function(p, q, **kwargs),
            lambda p, q: ref.on_probabilities(name, p, q, **kwargs),
            binary if name == "binary_kl" else probs,
        ),
        f"{function.__name__} logits": Case(
            lambda p, z: function(p, z, from_logits=True, **kwargs),
            lambda p, z: ref.on_target(name, p, z, **kwargs),
            (lambda rng: [binary(rng)[0], rng.normal(size=(2, 3, 4)).astype("float32")])
            if name == "binary_kl"
            else logits,
        ),
    }


SEQUENCE_KERNEL = np.random.default_rng(7).normal(size=(4, 6)).astype("float32")
SEQUENCE_TEACHER = np.random.default_rng(8).normal(size=(5, 6)).astype("float32")
SEQUENCE_WEIGHTS = np.array([1.0, 0.0, 2.0, 1.0, 0.5], "float32")  # token 1 is padding


def sequence_loss(hidden, backward="recompute"):
    """The chunked loss of hidden states (..., 5, 4), chunks of 2 tokens (the last one
    partial), against fixed teacher logits, the tokens weighed unevenly."""
    leading = tuple(hidden.shape[:-1])
    return sequence_distillation_loss(
        hidden,
        SEQUENCE_KERNEL,
        keras.ops.broadcast_to(SEQUENCE_TEACHER, (*leading, 6)),
        mask=keras.ops.broadcast_to(SEQUENCE_WEIGHTS, leading),
        divergence="jensen_shannon",
        beta=0.3,
        temperature=2.0,
        chunk_size=2,
        backward=backward,
    )


SEQUENCE_TOP_K = kl_keras.distillation.pack_top_k(
    np.argsort(-SEQUENCE_TEACHER, axis=-1)[:, :3].astype("int32"),
    np.sort(ref.log_softmax(np.float64(SEQUENCE_TEACHER)), axis=-1)[:, ::-1][:, :3],
)


def sequence_top_k_loss(hidden):
    """The chunked top-k loss (bucket) of hidden states (..., 5, 4), chunks of 2 tokens."""
    leading = tuple(hidden.shape[:-1])
    return kl_keras.distillation.sequence_top_k_distillation_loss(
        hidden,
        SEQUENCE_KERNEL,
        keras.ops.broadcast_to(SEQUENCE_TOP_K, (*leading, 6)),
        mask=keras.ops.broadcast_to(SEQUENCE_WEIGHTS, leading),
        divergence="reverse_kl",
        chunk_size=2,
    )


def sequence_top_k_reference(hidden):
    ids, log_probs = (
        np.broadcast_to(part, (*hidden.shape[:-1], 3))
        for part in (SEQUENCE_TOP_K[:, :3].astype("int64"), SEQUENCE_TOP_K[:, 3:])
    )
    values = ref.top_k("reverse_kl", ids, log_probs, hidden @ np.float64(SEQUENCE_KERNEL), "bucket")
    weights = np.broadcast_to(SEQUENCE_WEIGHTS, values.shape)
    return np.sum(weights * values) / np.sum(weights)


def sequence_reference(hidden):
    values = ref.on_logits(
        "jensen_shannon",
        np.broadcast_to(SEQUENCE_TEACHER, (*hidden.shape[:-1], 6)),
        hidden @ np.float64(SEQUENCE_KERNEL),
        temperature=2.0,
        beta=0.3,
    )
    weights = np.broadcast_to(SEQUENCE_WEIGHTS, values.shape)
    return np.sum(weights * values) / np.sum(weights)


POLICY_MASK = np.array([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
REF_LOGITS = np.random.default_rng(9).normal(size=(3, 4)).astype("float32")


def log_probabilities(rng):
    log_probs = np.log(rng.uniform(0.1, 1.0, size=(2, 3, 4)))
    return [
        log_probs.astype("float32"),
        (log_probs + 0.3 * rng.normal(size=(2, 3, 4))).astype("float32"),
    ]


def policy_reference(estimator, clip=None):
    def reference(log_probs, ref_log_probs):
        log_r = ref_log_probs - log_probs
        k = {
            "k1": -log_r,
            "k2": 0.5 * log_r**2,
            "k3": np.expm1(log_r) - log_r,
            "abs": np.abs(log_r),
        }[estimator]
        k = k if clip is None else np.clip(k, *clip)
        return np.broadcast_to(POLICY_MASK, k.shape) * k

    return reference


def policy_case(estimator, clip=None, curved=True):
    """policy_kl of a policy's and a reference's log-probabilities, some tokens masked; a
    "+" variant is the value of its estimator with the derivatives of k2, so "k2+" must
    match k2 in every mode."""
    return Case(
        lambda lp, rp: kl_keras.policy_kl(
            lp, rp, estimator, keras.ops.broadcast_to(POLICY_MASK, lp.shape), clip
        ),
        policy_reference(estimator.rstrip("+"), clip),
        log_probabilities,
        curved=curved,
    )


TOP_K_IDS = np.array([[0, 3, 5], [2, 1, 4], [5, 4, 3]], "int32")  # (3 tokens, k = 3) of V = 6
TOP_K_LOG_PROBS = np.log(np.array([[0.5, 0.2, 0.1], [0.6, 0.3, 0.05], [0.3, 0.3, 0.2]]))
TOP_K = kl_keras.distillation.pack_top_k(TOP_K_IDS, TOP_K_LOG_PROBS.astype("float32"))


def top_k_case(tail):
    """TopKDistillation of student logits (..., 3, 6) against a fixed packed top-3."""
    return Case(
        lambda z: kl_keras.TopKDistillation(tail, 2.0, "jensen_shannon", 0.3, reduction="none")(
            keras.ops.broadcast_to(TOP_K, (*z.shape[:-1], 6)), z
        ),
        lambda z: ref.top_k(
            "jensen_shannon",
            np.broadcast_to(TOP_K_IDS, (*z.shape[:-1], 3)),
            np.broadcast_to(np.float32(TOP_K_LOG_PROBS), (*z.shape[:-1], 3)),
            z,
            tail,
            2.0,
            0.3,
        ),
        lambda rng: [rng.normal(size=(2, 3, 6)).astype("float32")],
    )


# The modes each backend refuses for the chunked losses (each is tested to raise).
# backward="recompute": keras.remat is tf.recompute_grad (no forward mode; its while loop has
# no vectorised gradient) and torch.utils.checkpoint (no torch.func transforms).
RECOMPUTE = {
    "tensorflow": {"forward", "forward-over-reverse", "vmap-gradients"},
    "torch": {"forward-over-reverse", "vmap-gradients"},
}
# backward="stored", each chunk's gradient kept from the forward pass: a JAX custom_vjp (JAX
# differentiates its rules again, so second order holds), a TensorFlow custom_gradient and a
# PyTorch autograd.Function whose kept gradients refuse a second derivative.
STORED = {
    "jax": {"forward"},
    "tensorflow": {"forward", "reverse-over-reverse", "forward-over-reverse"},
    "torch": {
        "forward",
        "reverse-over-reverse",
        "forward-over-reverse",
        "vmap-values",
        "vmap-gradients",
    },
}

CASES = {
    **family("kl", kl_keras.kl_divergence),
    **family("reverse_kl", kl_keras.reverse_kl_divergence),
    **family("jeffreys", kl_keras.jeffreys_divergence),
    **family("jensen_shannon", kl_keras.jensen_shannon_divergence, beta=0.3),
    **family("binary_kl", kl_keras.binary_kl_divergence),
    **{
        f"LogitsDistillation {divergence}{suffix}": Case(
            lambda t, s, d=divergence: kl_keras.LogitsDistillation(
                2.0, d, beta=0.3, reduction="none"
            )(t, s),
            lambda t, s, d=divergence: ref.on_logits(d, t, s, temperature=2.0, beta=0.3),
            inputs,
        )
        for divergence in ("kl", "reverse_kl", "jeffreys", "jensen_shannon")
        for suffix, inputs in (("", two_logits), (" close", close_logits))
    },
    "kl_divergence logits close": Case(
        lambda p, z: kl_keras.kl_divergence(p, z, from_logits=True),
        lambda p, z: ref.on_target("kl", p, z),
        lambda rng: (lambda t, s: [softmax(np.float64(t), -1).astype("float32"), s])(
            *close_logits(rng)
        ),
    ),
    "kl_divergence probabilities close": Case(
        lambda p, q: kl_keras.kl_divergence(p, q),
        lambda p, q: ref.on_probabilities("kl", p, q),
        close_probabilities,
    ),
    "sequence_distillation_loss": Case(
        lambda h: sequence_loss(h, backward="recompute"),
        sequence_reference,
        lambda rng: [rng.normal(size=(2, 5, 4)).astype("float32")],
        unsupported=RECOMPUTE,
    ),
    "sequence_distillation_loss stored": Case(
        lambda h: sequence_loss(h, backward="stored"),
        sequence_reference,
        lambda rng: [rng.normal(size=(2, 5, 4)).astype("float32")],
        unsupported=STORED,
    ),
    **{f"policy_kl {e}": policy_case(e) for e in ("k2", "k3", "k2+")},
    **{f"policy_kl {e}": policy_case(e, curved=False) for e in ("k1", "abs")},
    "policy_kl k3 clipped": policy_case("k3", clip=(0.0, 0.05)),
    "policy_kl_from_logits close": Case(
        lambda z: kl_keras.policy_kl_from_logits(z, keras.ops.broadcast_to(REF_LOGITS, z.shape)),
        lambda z: ref.on_logits("kl", z, np.broadcast_to(REF_LOGITS, z.shape)),
        lambda rng: [(REF_LOGITS + 0.02 * rng.normal(size=(2, 3, 4))).astype("float32")],
    ),
    "TopKDistillation bucket": top_k_case("bucket"),
    "TopKDistillation renormalize": top_k_case("renormalize"),
    "sequence_top_k_distillation_loss": Case(  # its default: backward="stored"
        sequence_top_k_loss,
        sequence_top_k_reference,
        lambda rng: [rng.normal(size=(2, 5, 4)).astype("float32")],
        unsupported=STORED,
    ),
    "gaussian_kl_divergence": Case(
        kl_keras.gaussian_kl_divergence,
        ref.gaussian_kl,
        lambda rng: [rng.normal(size=(2, 3, 4)).astype("float32") for _ in range(4)],
    ),
    "VariationalSampling added loss": Case(
        added_loss(kl_keras.VariationalSampling(0.7, free_bits=0.05), (None, 3, 4), (None, 3, 4)),
        reference_sampling_loss,
        lambda rng: [rng.normal(size=(2, 3, 4)).astype("float32") for _ in range(2)],
    ),
    "KLActivityRegularization added loss": Case(
        added_loss(kl_keras.KLActivityRegularization(rho=0.2, beta=1.5), (None, 4, 3)),
        lambda x: ref.sparsity_penalty(x, rho=0.2, beta=1.5),
        lambda rng: [rng.uniform(0.05, 0.95, size=(2, 4, 3)).astype("float32")],
    ),
    "KLActivityRegularizer.penalty": Case(
        lambda x: kl_keras.KLActivityRegularizer(rho=0.2, beta=1.5).penalty(x),
        lambda x: ref.sparsity_penalty(x, rho=0.2, beta=1.5),
        lambda rng: [rng.uniform(0.05, 0.95, size=(2, 4, 3)).astype("float32")],
    ),
}


# ---------------------------------------------------------------- float64 references


def objective(reference, args, regularized):
    value = np.sum(reference(*args))
    if regularized:
        value += 0.5 * sum(np.sum(a * a) for a in args)
    return value


def reference_gradient(case, args, regularized=False, step=1e-6):
    args = [np.float64(a) for a in args]
    grads = []
    for i, a in enumerate(args):
        grad = np.zeros_like(a)
        for index in np.ndindex(a.shape):
            shifted = []
            for sign in (1, -1):
                moved = [b.copy() for b in args]
                moved[i][index] += sign * step
                shifted.append(objective(case.reference, moved, regularized))
            grad[index] = (shifted[0] - shifted[1]) / (2 * step)
        grads.append(grad)
    return grads


def reference_jvp(case, args, tangents, step=1e-6):
    args = [np.float64(a) for a in args]
    plus = [a + step * t for a, t in zip(args, tangents, strict=True)]
    minus = [a - step * t for a, t in zip(args, tangents, strict=True)]
    return (np.sum(case.reference(*plus)) - np.sum(case.reference(*minus))) / (2 * step)


def reference_hvp(case, args, tangents, regularized, step=2e-5):
    """H·v as the central difference of the gradient along v.

    The step is small enough that the truncation error stays below 1e-6 relative
    where the Hessian is 1/p with p >= 0.02, and large enough for float64 rounding.
    """
    args = [np.float64(a) for a in args]
    plus = [a + step * t for a, t in zip(args, tangents, strict=True)]
    minus = [a - step * t for a, t in zip(args, tangents, strict=True)]
    grads_plus = reference_gradient(case, plus, regularized, step)
    grads_minus = reference_gradient(case, minus, regularized, step)
    return [(gp - gm) / (2 * step) for gp, gm in zip(grads_plus, grads_minus, strict=True)]


# ---------------------------------------------------------------- each backend's autodiff


def scalar(case, regularized=False):
    """`(*tensors) -> scalar tensor` on the current backend."""
    from keras import ops

    def f(*args):
        value = ops.sum(case.fn(*args))
        if regularized:
            value = value + 0.5 * sum(ops.sum(a * a) for a in args)
        return value

    return f


def tensors(args):
    if BACKEND == "torch":
        import torch

        return [torch.tensor(a) for a in args]
    from keras import ops

    return [ops.convert_to_tensor(a) for a in args]


def reverse_mode(f, args):
    args = tensors(args)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(args)
            value = f(*args)
        return tape.gradient(value, args)
    if BACKEND == "jax":
        import jax

        return jax.grad(f, argnums=tuple(range(len(args))))(*args)
    import torch

    args = [a.requires_grad_(True) for a in args]
    return torch.autograd.grad(f(*args), args)


def forward_mode(f, args, tangents):
    args, tangents = tensors(args), tensors(tangents)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.autodiff.ForwardAccumulator(args, tangents) as accumulator:
            value = f(*args)
        return accumulator.jvp(value)
    if BACKEND == "jax":
        import jax

        return jax.jvp(f, tuple(args), tuple(tangents))[1]
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        duals = [fwad.make_dual(a, t) for a, t in zip(args, tangents, strict=True)]
        return fwad.unpack_dual(f(*duals)).tangent


def hvp_reverse_over_reverse(f, args, tangents):
    """The double backward of gradient penalties: grad of <grad f, v>."""
    args, tangents = tensors(args), tensors(tangents)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as outer:
            outer.watch(args)
            with tf.GradientTape() as inner:
                inner.watch(args)
                value = f(*args)
            grads = inner.gradient(value, args)
            dot = sum(tf.reduce_sum(g * t) for g, t in zip(grads, tangents, strict=True))
        # Zeros, not None, where the gradient is constant (a linear estimator).
        return outer.gradient(dot, args, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        argnums = tuple(range(len(args)))

        def dot(*xs):
            grads = jax.grad(f, argnums=argnums)(*xs)
            return sum(jnp.sum(g * t) for g, t in zip(grads, tangents, strict=True))

        return jax.grad(dot, argnums=argnums)(*args)
    import torch

    args = [a.requires_grad_(True) for a in args]
    grads = torch.autograd.grad(f(*args), args, create_graph=True)
    dot = sum(torch.sum(g * t) for g, t in zip(grads, tangents, strict=True))
    # Zeros, not an error, where the gradient is constant (a linear estimator).
    if not dot.requires_grad:
        return [torch.zeros_like(a) for a in args]
    return torch.autograd.grad(dot, args, allow_unused=True, materialize_grads=True)


def hvp_forward_over_reverse(f, args, tangents):
    """The JVP of the gradient: how Newton-type solvers form H·v."""
    args, tangents = tensors(args), tensors(tangents)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.autodiff.ForwardAccumulator(args, tangents) as accumulator:
            with tf.GradientTape() as tape:
                tape.watch(args)
                value = f(*args)
            grads = tape.gradient(value, args)
        zero = tf.UnconnectedGradients.ZERO  # where the gradient is constant (linear)
        return [accumulator.jvp(g, unconnected_gradients=zero) for g in grads]
    if BACKEND == "jax":
        import jax

        gradient = jax.grad(f, argnums=tuple(range(len(args))))
        return jax.jvp(gradient, tuple(args), tuple(tangents))[1]
    import torch.func

    gradient = torch.func.grad(f, argnums=tuple(range(len(args))))
    return torch.func.jvp(gradient, tuple(args), tuple(tangents))[1]


def vmap_values(fn, args):
    args = tensors(args)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.vectorized_map(lambda xs: fn(*xs), args)
    if BACKEND == "jax":
        import jax

        return jax.vmap(fn)(*args)
    import torch.func

    return torch.func.vmap(fn)(*args)


def vmap_gradients(f, args):
    """Per-example gradients: the gradient of `f` on each slice of the leading axis."""
    args = tensors(args)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        def per_example(xs):
            with tf.GradientTape() as tape:
                tape.watch(xs)
                value = f(*xs)
            return tape.gradient(value, xs)

        return tf.vectorized_map(per_example, args)
    argnums = tuple(range(len(args)))
    if BACKEND == "jax":
        import jax

        return jax.vmap(jax.grad(f, argnums=argnums))(*args)
    import torch.func

    return torch.func.vmap(torch.func.grad(f, argnums=argnums))(*args)


# ---------------------------------------------------------------- the tests


def assert_close(actual, expected):
    actual = [to_numpy(a) for a in actual] if isinstance(actual, (list, tuple)) else actual
    expected = expected if isinstance(expected, list) else [expected]
    actual = actual if isinstance(actual, list) else [to_numpy(actual)]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        scale = max(np.max(np.abs(e)), 1.0)
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=ATOL * scale)


def setup(name, seed=0):
    rng = np.random.default_rng(seed)
    case = CASES[name]
    args = case.inputs(rng)
    directions = [rng.normal(size=a.shape).astype("float32") for a in args]
    return case, args, directions


@pytest.mark.parametrize("name", sorted(CASES))
def test_values(name):
    case, args, _ = setup(name)
    assert_close(case.fn(*tensors(args)), case.reference(*[np.float64(a) for a in args]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_reverse_mode(name):
    case, args, _ = setup(name)
    assert_close(reverse_mode(scalar(case), args), reference_gradient(case, args))


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_mode(name):
    case, args, directions = setup(name)
    with in_mode(case, "forward"):
        assert_close(
            forward_mode(scalar(case), args, directions), reference_jvp(case, args, directions)
        )


@pytest.mark.parametrize("regularized", [False, True], ids=["alone", "in-larger-objective"])
@pytest.mark.parametrize("style", ["reverse-over-reverse", "forward-over-reverse"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_hessian_vector_product(name, style, regularized):
    case, args, directions = setup(name)
    hvp = {
        "reverse-over-reverse": hvp_reverse_over_reverse,
        "forward-over-reverse": hvp_forward_over_reverse,
    }[style]
    with in_mode(case, style):
        actual = hvp(scalar(case, regularized), args, directions)
    if style in case.unsupported.get(BACKEND, ()):
        return
    expected = reference_hvp(case, args, directions, regularized)
    assert_close(list(actual), expected)
    if regularized and case.curved:
        # The larger objective's H·v is the divergence's H·v plus v: a dropped
        # second derivative would leave v alone.
        alone = reference_hvp(case, args, directions, regularized=False)
        assert max(np.max(np.abs(a)) for a in alone) > 1e-2


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_values(name):
    case, args, _ = setup(name)
    expected = np.stack(
        [case.reference(*[np.float64(a[i]) for a in args]) for i in range(len(args[0]))]
    )
    with in_mode(case, "vmap-values"):
        assert_close(vmap_values(case.fn, args), expected)


@pytest.mark.parametrize("name", sorted(CASES))
def test_vmap_per_example_gradients(name):
    case, args, _ = setup(name)
    per_example = [reference_gradient(case, [a[i] for a in args]) for i in range(len(args[0]))]
    expected = [np.stack([g[k] for g in per_example]) for k in range(len(args))]
    with in_mode(case, "vmap-gradients"):
        assert_close(list(vmap_gradients(scalar(case), args)), expected)
