"""Peak memory and step time of the chunked sequence loss against the dense one.

    KERAS_BACKEND=jax python benchmarks/bench_sequence.py [--sizes 2048x32000 ...]
        [--hidden 1024] [--chunk-size 1024] [--repeats 3] [--json out.json]

One step is the loss and its gradient with respect to the student's hidden states and head
kernel (what training needs), the teacher given as hidden states and a head of its own:
- `stored` and `recompute`: `sequence_distillation_loss(h, kernel, (teacher_h,
  teacher_kernel), mask, backward=...)`, the fused loss with each chunk's gradient kept from
  the forward pass, or each chunk computed again in the backward pass;
- `dense`: both models' full logits (`h @ kernel`), then `LogitsDistillation` with the mask
  as sample weights (the same KL, divided by the real tokens).
Compiled as training compiles it: `tf.function` (TensorFlow's default for `fit`; XLA cannot
compile a `tf.recompute_grad` loop), `jax.jit`, PyTorch eager. Each (size, contender) runs
in a fresh process: its peak is the growth of the process's peak resident memory over what
the inputs alone hold (`ru_maxrss`, compilation included), so one run's buffers never count
for another; glibc returns each freed buffer of 1 MB or more at once
(`MALLOC_MMAP_THRESHOLD_`), so the peak is that of the buffers alive together. A dense step
predicted to need more than `--memory-limit` GB (7 float32 (N, V) tensors) is not run and is
reported as not fitting. Nothing here asserts a timing.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from functools import partial

BACKEND = os.environ.get("KERAS_BACKEND", "tensorflow")
DENSE_COPIES = 7  # (N, V) float32 tensors a dense step holds at once (0.2's measures: 4.5-8.8)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(contender, tokens, hidden_size, vocabulary, chunk_size, repeats):
    """One contender at one size, in this process: {"peak_gb", "seconds"}."""
    import keras
    import numpy as np

    from kl_keras import LogitsDistillation
    from kl_keras.distillation import sequence_distillation_loss

    rng = np.random.default_rng(0)
    scale = 1 / np.sqrt(hidden_size)
    h = rng.normal(size=(tokens, hidden_size)).astype("float32")
    kernel = (rng.normal(size=(hidden_size, vocabulary)) * scale).astype("float32")
    teacher_h = rng.normal(size=(tokens, hidden_size)).astype("float32")
    teacher_kernel = (rng.normal(size=(hidden_size, vocabulary)) * scale).astype("float32")
    mask = (rng.uniform(size=(tokens,)) > 0.1).astype("float32")

    def fused(h, kernel, teacher_h, teacher_kernel, mask, backward):
        return sequence_distillation_loss(
            h, kernel, (teacher_h, teacher_kernel), mask, chunk_size=chunk_size, backward=backward
        )

    dense_loss = LogitsDistillation()

    def dense(h, kernel, teacher_h, teacher_kernel, mask):
        teacher = keras.ops.stop_gradient(keras.ops.matmul(teacher_h, teacher_kernel))
        loss = dense_loss(teacher, keras.ops.matmul(h, kernel), sample_weight=mask)
        return loss * keras.ops.cast(tokens, "float32") / keras.ops.sum(mask)

    step = compile_step(dense if contender == "dense" else partial(fused, backward=contender))
    args = [to_backend(a) for a in (h, kernel, teacher_h, teacher_kernel, mask)]
    baseline = rss_bytes()
    times = []
    for _ in range(repeats + 1):  # the first run compiles
        start = time.perf_counter()
        finish(step(*args))
        times.append(time.perf_counter() - start)
    return {"peak_gb": (peak_bytes() - baseline) / 1e9, "seconds": statistics.median(times[1:])}


def to_backend(x):
    import keras

    return keras.ops.convert_to_tensor(x)


def compile_step(fn):
    """`(h, kernel, ...) -> (loss, d loss / d h, d loss / d kernel)`, compiled."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(h, kernel, *rest):
            with tf.GradientTape() as tape:
                tape.watch([h, kernel])
                loss = fn(h, kernel, *rest)
            return loss, *tape.gradient(loss, [h, kernel])

        return step
    if BACKEND == "jax":
        import jax

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    import torch

    def step(h, kernel, *rest):
        h, kernel = h.requires_grad_(True), kernel.requires_grad_(True)
        loss = fn(h, kernel, *rest)
        return loss, *torch.autograd.grad(loss, [h, kernel])

    return step


def finish(out):
    import keras

    return [keras.ops.convert_to_numpy(x) for x in keras.tree.flatten(out)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=[
            "2048x32000",
            "8192x32000",
            "2048x131072",
            "8192x131072",
            "2048x262144",
            "8192x262144",
        ],
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--contenders", nargs="+", default=["stored", "recompute", "dense"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit", type=float, default=20.0)
    parser.add_argument("--json")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # contender tokens vocab
    args = parser.parse_args()
    if args.one:
        contender, tokens, vocabulary = args.one[0], int(args.one[1]), int(args.one[2])
        result = measure(contender, tokens, args.hidden, vocabulary, args.chunk_size, args.repeats)
        print("RESULT", json.dumps(result))
        return
    rows = []
    for size in args.sizes:
        tokens, vocabulary = (int(s) for s in size.split("x"))
        row = {
            "backend": BACKEND,
            "tokens": tokens,
            "hidden": args.hidden,
            "vocabulary": vocabulary,
            "chunk_size": args.chunk_size,
        }
        for contender in args.contenders:
            if (
                contender == "dense"
                and DENSE_COPIES * tokens * vocabulary * 4 > args.memory_limit * 1e9
            ):
                row[contender] = "does not fit"
                continue
            command = [
                sys.executable,
                __file__,
                "--one",
                contender,
                str(tokens),
                str(vocabulary),
                "--hidden",
                str(args.hidden),
                "--chunk-size",
                str(args.chunk_size),
                "--repeats",
                str(args.repeats),
            ]
            environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=3600, env=environment
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
            row[contender] = json.loads(lines[-1][7:]) if lines else f"failed: {done.stderr[-300:]}"
        for contender in ("stored", "recompute"):
            if isinstance(row.get("dense"), dict) and isinstance(row.get(contender), dict):
                row[f"{contender} memory_ratio"] = (
                    row[contender]["peak_gb"] / row["dense"]["peak_gb"]
                )
                row[f"{contender} time_ratio"] = row[contender]["seconds"] / row["dense"]["seconds"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
