"""Forward+backward cost of the KL family against its naive keras.ops form and the peers.

    KERAS_BACKEND=jax python benchmarks/bench_family.py [--repeats 20] [--json out.json]

For each divergence, from logits (the path distillation takes), the gradient with respect
to the logits, compiled as in `bench_kl.py` (`tf.function(jit_compile=True)`, `jax.jit`,
PyTorch eager), contenders interleaved call by call, medians. Contenders per divergence:
- `kl_keras`: the kl_keras loss class, `from_logits=True`;
- `naive`: the same formula written the way users write it with `keras.ops`: softmax (or
  sigmoid), then logs of probabilities clipped to [1e-7, 1] as Keras's own KL clips them;
- `logits_distillation`: `LogitsDistillation(temperature=4)` on teacher and student logits,
  against softmax of both / T, `keras.losses.KLDivergence` and T² (what Keras's own
  `LogitsDistillation` computes when given a `KLDivergence` instance);
- peers: `F.kl_div(log P, softmax(z))` for reverse KL (torch backend); TRL's
  `generalized_jsd_loss` formula (two log-softmaxes mixed with `logsumexp`, two `kl_div`s with
  `log_target`) written with `keras.ops` for Jensen-Shannon; `binary_cross_entropy_with_logits`
  minus the entropy of the target for binary KL (torch backend).
Nothing here asserts a timing.
"""

import argparse
import json
import math
import statistics
import time

import keras
from bench_kl import BACKEND, SIZES, compile_value_and_grad, make_inputs
from keras import ops

import kl_keras

BETA = 0.5
TEMPERATURE = 4.0


def clipped_log(x):
    return ops.log(ops.clip(x, 1e-7, 1.0))


def per_row_mean(values):
    return ops.mean(values)


def naive(name):
    def reverse(p, z):
        q = ops.softmax(z)
        return per_row_mean(ops.sum(q * (clipped_log(q) - clipped_log(p)), axis=-1))

    def jeffreys(p, z):
        q = ops.softmax(z)
        return per_row_mean(ops.sum((p - q) * (clipped_log(p) - clipped_log(q)), axis=-1))

    def jensen_shannon(p, z):
        q = ops.softmax(z)
        m = BETA * p + (1 - BETA) * q
        log_m = clipped_log(m)
        terms = (1 - BETA) * p * (clipped_log(p) - log_m) + BETA * q * (clipped_log(q) - log_m)
        return per_row_mean(ops.sum(terms, axis=-1))

    def binary(p, z):
        q = ops.sigmoid(z)
        terms = p * (clipped_log(p) - clipped_log(q))
        terms = terms + (1 - p) * (clipped_log(1 - p) - clipped_log(1 - q))
        return per_row_mean(ops.sum(terms, axis=-1))

    return {
        "reverse_kl": reverse,
        "jeffreys": jeffreys,
        "jensen_shannon": jensen_shannon,
        "binary_kl": binary,
    }[name]


def trl_jsd(p, z):
    """TRL's generalized_jsd_loss formula (teacher P, student softmax(z)) in keras.ops.

    TRL mixes M = beta * P + (1 - beta) * Q like kl_keras, but weights the teacher's term by
    beta and the student's by 1 - beta; at beta = 0.5 both forms agree, so the cost compares.
    """
    student = z - ops.logsumexp(z, axis=-1, keepdims=True)
    teacher = ops.log(p)
    mixture = ops.logsumexp(
        ops.stack([student + math.log(1 - BETA), teacher + math.log(BETA)]), axis=0
    )
    # kl_div(mixture, target, log_target=True) = sum(exp(target) * (target - mixture))
    kl_teacher = ops.sum(ops.exp(teacher) * (teacher - mixture), axis=-1)
    kl_student = ops.sum(ops.exp(student) * (student - mixture), axis=-1)
    return per_row_mean(BETA * kl_teacher + (1 - BETA) * kl_student)


def contenders():
    table = {}
    for name, cls in [
        ("reverse_kl", kl_keras.ReverseKLDivergence),
        ("jeffreys", kl_keras.JeffreysDivergence),
        ("jensen_shannon", kl_keras.JensenShannonDivergence),
        ("binary_kl", kl_keras.BinaryKLDivergence),
    ]:
        loss = cls(from_logits=True)
        table[name] = {"kl_keras": lambda p, z, loss=loss: loss(p, z), "naive": naive(name)}
    table["jensen_shannon"]["TRL formula"] = trl_jsd
    # Distillation: both arguments are logits; the naive form is the one Keras computes when
    # its LogitsDistillation is given a keras.losses.KLDivergence instance (its correct use).
    distillation = kl_keras.LogitsDistillation(temperature=TEMPERATURE)
    keras_kl = keras.losses.KLDivergence()

    def keras_distillation(teacher, z):
        p = ops.softmax(teacher / TEMPERATURE)
        return keras_kl(p, ops.softmax(z / TEMPERATURE)) * TEMPERATURE**2

    table["logits_distillation"] = {"kl_keras": distillation, "naive": keras_distillation}
    if BACKEND == "torch":
        import torch.nn.functional as F

        def torch_reverse(p, z):
            flat = z.reshape(-1, z.shape[-1])
            q = F.softmax(flat, dim=-1)
            return F.kl_div(p.reshape(flat.shape).log(), q, reduction="batchmean")

        def torch_binary(p, z):
            bce = F.binary_cross_entropy_with_logits(z, p, reduction="sum")
            entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum()
            return (bce - entropy) / (p.numel() // p.shape[-1])

        table["reverse_kl"]["torch kl_div swapped"] = torch_reverse
        table["binary_kl"]["torch BCE-with-logits - entropy"] = torch_binary
    return table


def run(shape, repeats):
    results = {}
    for divergence, entries in contenders().items():
        p, z = make_inputs(shape, "logits")
        if divergence == "binary_kl":  # independent events: entries in (0, 1), not rows
            p = ops.sigmoid(z * 0.5 + 0.3)
        if divergence == "logits_distillation":  # teacher logits, not probabilities
            p = ops.flip(z, axis=-1) * 2.0
        prepared = {}
        for name, fn in entries.items():
            step, block = compile_value_and_grad(fn, torch_compile=False)
            block(step(p, z))
            prepared[name] = (step, block)
        times = {name: [] for name in prepared}
        for _ in range(repeats):
            for name, (step, block) in prepared.items():
                start = time.perf_counter()
                block(step(p, z))
                times[name].append(time.perf_counter() - start)
        results[divergence] = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    mode = {"tensorflow": "tf.function(jit_compile=True)", "jax": "jax.jit"}.get(BACKEND, "eager")
    output = {"backend": BACKEND, "mode": mode, "keras": keras.__version__, "family": {}}
    print(f"backend {BACKEND} ({mode}), keras {keras.__version__}, median of {args.repeats}")
    for size in args.sizes:
        rows = run(SIZES[size], args.repeats)
        output["family"][size] = {"shape": SIZES[size], "rows": rows}
        print(f"\n{size} {SIZES[size]}")
        for divergence, timings in rows.items():
            for name, ms in timings.items():
                ratio = ms / timings["naive"]
                print(f"  {divergence:<21}{name:<34}{ms:9.2f} ms  {ratio:.2f}x naive")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(output, f, indent=1)


if __name__ == "__main__":
    main()
