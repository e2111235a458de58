"""Forward+backward cost of KL losses, side by side in one process, on any Keras backend.

    KERAS_BACKEND=jax python benchmarks/bench_kl.py [--repeats 30] [--json out.json]

Each contender computes a scalar loss and its gradient with respect to `y_pred`,
compiled with the backend's compiler (`tf.function(jit_compile=True)`, `jax.jit`;
on PyTorch eager and, with `--torch-compile`, `torch.compile`). Contenders are
interleaved call by call so that machine noise hits them alike; the report gives
medians and their ratios to the baseline each one replaces. Nothing here asserts
a timing.

Contenders:
- `kl_keras logits`: `KLDivergence(from_logits=True)(p, z)`
- `keras softmax+KLD`: `keras.losses.KLDivergence()(p, softmax(z))`, what users write today
- `kl_keras probs`: `KLDivergence()(p, q)`
- `keras KLD probs`: `keras.losses.KLDivergence()(p, q)`
- `torch kl_div`: `F.kl_div(F.log_softmax(z), p, reduction="batchmean")` (torch backend)
- `optax kl_divergence`: `optax.losses.kl_divergence(log_softmax(z), p).mean()` (jax backend)
- `memory floor`: `sum(p * z) / batch` and its gradient: reads both inputs once and writes
  one gradient, the least any KL loss can do.
"""

import argparse
import gc
import json
import platform
import statistics
import time

import keras
import numpy as np

import kl_keras

BACKEND = keras.backend.backend()
SIZES = {"classification": (2048, 1000), "vocabulary": (256, 32000), "sequences": (4, 256, 32000)}


def batch_mean(loss_per_row):
    return keras.ops.mean(loss_per_row)


def contenders():
    kl_logits = kl_keras.KLDivergence(from_logits=True)
    kl_probs = kl_keras.KLDivergence()
    keras_kld = keras.losses.KLDivergence()
    # Per-row means: (4, 256, V) averages over its 1024 rows like the Keras losses do.
    table = {
        "kl_keras logits": ("logits", lambda p, z: kl_logits(p, z)),
        "keras softmax+KLD": ("logits", lambda p, z: keras_kld(p, keras.ops.softmax(z))),
        "kl_keras probs": ("probs", lambda p, q: kl_probs(p, q)),
        "keras KLD probs": ("probs", lambda p, q: keras_kld(p, q)),
        "memory floor": (
            "logits",
            lambda p, z: keras.ops.sum(p * z) / np.prod(p.shape[:-1]),
        ),
    }
    if BACKEND == "torch":
        import torch.nn.functional as F

        def torch_kl_div(p, z):
            flat = z.reshape(-1, z.shape[-1])
            return F.kl_div(
                F.log_softmax(flat, dim=-1), p.reshape(flat.shape), reduction="batchmean"
            )

        table["torch kl_div"] = ("logits", torch_kl_div)
    if BACKEND == "jax":
        try:
            import jax
            import optax
        except ImportError:
            pass
        else:
            table["optax kl_divergence"] = (
                "logits",
                lambda p, z: optax.losses.kl_divergence(jax.nn.log_softmax(z), p).mean(),
            )
    return table


def compile_value_and_grad(fn, torch_compile):
    """`(p, y) -> (loss, dloss/dy)`, compiled by the backend's compiler."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(p, y):
            with tf.GradientTape() as tape:
                tape.watch(y)
                loss = fn(p, y)
            return loss, tape.gradient(loss, y)

        return step, lambda out: [t.numpy() for t in out]
    if BACKEND == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(fn, argnums=1))
        return step, lambda out: jax.block_until_ready(out)
    import torch

    def step(p, y):
        y = y.detach().requires_grad_(True)
        loss = fn(p, y)
        (grad,) = torch.autograd.grad(loss, y)
        return loss, grad

    if torch_compile:
        # One compiled graph per contender: they share `step`'s code object, and dynamo's
        # default of 8 graphs per code object would silently run the rest eagerly.
        torch._dynamo.config.recompile_limit = 64
        step = torch.compile(step)
    return step, lambda out: out


def make_inputs(shape, kind, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=shape).astype("float32")
    p = np.exp(rng.normal(scale=2.0, size=shape)).astype("float32")
    p /= p.sum(-1, keepdims=True)
    if kind == "probs":
        y = np.exp(logits - logits.max(-1, keepdims=True))
        y = (y / y.sum(-1, keepdims=True)).astype("float32")
    else:
        y = logits
    return keras.ops.convert_to_tensor(p), keras.ops.convert_to_tensor(y)


def peak_temp_bytes(fn, p, y):
    """Bytes XLA allocates beyond inputs and outputs for fwd+bwd (JAX only), else None."""
    if BACKEND != "jax":
        return None
    import jax

    compiled = jax.jit(jax.value_and_grad(fn, argnums=1)).lower(p, y).compile()
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def _resident_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_resident_bytes(step, block, p, y):
    """Peak memory of one fwd+bwd call above what was in use before it.

    JAX and PyTorch: the kernel's high-water mark of resident memory (VmHWM, Linux), reset
    through /proc/self/clear_refs just before the call; it counts the temporaries, the
    gradient and the loss, whoever allocates them. TensorFlow keeps freed memory in its own
    allocator's pool, so there the allocator's peak (`get_memory_info("CPU:0")`) is read.
    """
    gc.collect()
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        out = block(step(p, y))
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        del out
        return peak - before
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _resident_bytes("VmRSS")
    out = block(step(p, y))
    peak = _resident_bytes("VmHWM")
    del out
    return peak - before


def run(size_name, shape, repeats, torch_compile):
    table = contenders()
    prepared = {}
    for name, (kind, fn) in table.items():
        p, y = make_inputs(shape, kind)
        step, block = compile_value_and_grad(fn, torch_compile)
        block(step(p, y))  # compile and warm up
        prepared[name] = (step, block, p, y, fn)
    times = {name: [] for name in prepared}
    for _ in range(repeats):
        for name, (step, block, p, y, _) in prepared.items():
            start = time.perf_counter()
            block(step(p, y))
            times[name].append(time.perf_counter() - start)
    input_bytes = int(np.prod(shape)) * 4
    rows = {}
    for name, (step, block, p, y, fn) in prepared.items():
        large = size_name == "sequences"
        temp = peak_temp_bytes(fn, p, y) if large else None
        peak = peak_resident_bytes(step, block, p, y) if large else None
        rows[name] = {
            "median_ms": 1e3 * statistics.median(times[name]),
            "temp_bytes": temp,
            "temp_over_input": None if temp is None else temp / input_bytes,
            "peak_bytes": peak,
            "peak_over_input": None if peak is None else peak / input_bytes,
        }
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--torch-compile", action="store_true")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    mode = {"tensorflow": "tf.function(jit_compile=True)", "jax": "jax.jit"}.get(
        BACKEND, "torch.compile" if args.torch_compile else "eager"
    )
    results = {
        "backend": BACKEND,
        "mode": mode,
        "keras": keras.__version__,
        "kl_keras": kl_keras.__version__,
        "machine": platform.platform(),
        "sizes": {},
    }
    print(f"backend {BACKEND} ({mode}), keras {keras.__version__}, median of {args.repeats}")
    for size_name in args.sizes:
        rows = run(size_name, SIZES[size_name], args.repeats, args.torch_compile)
        results["sizes"][size_name] = {"shape": SIZES[size_name], "rows": rows}
        floor = rows["memory floor"]["median_ms"]
        baselines = {
            "kl_keras logits": "keras softmax+KLD",
            "kl_keras probs": "keras KLD probs",
        }
        print(f"\n{size_name} {SIZES[size_name]}")
        print(f"  {'contender':<22}{'median ms':>11}{'vs floor':>10}  vs what it replaces")
        for name, row in rows.items():
            versus = ""
            if name in baselines:
                ratio = row["median_ms"] / rows[baselines[name]]["median_ms"]
                versus = f"{ratio:.2f}x {baselines[name]}"
            line = (
                f"  {name:<22}{row['median_ms']:>11.2f}{row['median_ms'] / floor:>9.2f}x  {versus}"
            )
            if row["temp_over_input"] is not None:
                line += f"  [temp memory {row['temp_over_input']:.2f}x one input]"
            if row["peak_over_input"] is not None:
                line += f"  [peak memory {row['peak_over_input']:.2f}x one input]"
            print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
