"""Two versions of kl_keras side by side in one process: every loss form, old against new.

    KERAS_BACKEND=jax python benchmarks/bench_versions.py --old ../kl_keras-0.2.0 [--json out]

`--old` is a source tree (or a `git worktree`) of the version to compare with; its package
is copied under the name `kl_keras_old` (registered names included, so both load in one
process), and every form of the family (each divergence's loss on probabilities and from
logits, `LogitsDistillation` for each divergence at T = 4) is timed forward+backward,
compiled as in `bench_kl.py`, old and new interleaved call by call (each going first every
other time), medians. The ratio new / old is what a refactor must keep at or below 1, within
the noise (the quartiles of the call-by-call ratios are printed with it). On JAX,
`--programs` also compares what XLA compiles for each form: the optimized programs'
operations, names and debug information left out (identical programs mean the same work,
whatever the timings say). Nothing here asserts a timing.
"""

import argparse
import importlib
import json
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time

import keras
from bench_kl import BACKEND, SIZES, compile_value_and_grad, make_inputs

import kl_keras

NAMES = ("kl", "reverse_kl", "jeffreys", "jensen_shannon", "binary_kl")


def load_old(tree):
    """The package of the source tree `tree`, imported as `kl_keras_old`."""
    target = pathlib.Path(tempfile.mkdtemp()) / "kl_keras_old"
    shutil.copytree(pathlib.Path(tree) / "kl_keras", target)
    for path in target.glob("*.py"):
        text = path.read_text()
        path.write_text(re.sub(r"\bkl_keras\b", "kl_keras_old", text))
    sys.path.insert(0, str(target.parent))
    return importlib.import_module("kl_keras_old")


def forms(package):
    """name -> (kind of inputs, loss object) for one version of the package."""
    table = {}
    for name in NAMES:
        cls = {
            "kl": package.KLDivergence,
            "reverse_kl": package.ReverseKLDivergence,
            "jeffreys": package.JeffreysDivergence,
            "jensen_shannon": package.JensenShannonDivergence,
            "binary_kl": package.BinaryKLDivergence,
        }[name]
        table[f"{name} probabilities"] = ("probs", cls())
        table[f"{name} logits"] = ("logits", cls(from_logits=True))
        if name != "binary_kl":
            table[f"LogitsDistillation {name}"] = (
                "teacher",
                package.LogitsDistillation(temperature=4.0, divergence=name),
            )
    return table


def inputs(shape, kind):
    if kind == "teacher":
        _, teacher = make_inputs(shape, "logits", seed=1)
        _, student = make_inputs(shape, "logits", seed=2)
        return teacher, student
    return make_inputs(shape, kind)


def program_ops(step, a, b):
    """The operations of the optimized XLA program of a jitted step, sorted, no names."""
    ops = []
    for line in step.lower(a, b).compile().as_text().splitlines():
        line = line.strip()
        if " = " in line:
            rhs = re.sub(r", metadata=.*", "", line.split(" = ", 1)[1])
            ops.append(re.sub(r"%[\w.-]+", "x", rhs).split(",", 1)[0])
    return sorted(ops)


def run(shape, old, repeats, programs=False):
    rows = {}
    new_forms, old_forms = forms(kl_keras), forms(old)
    for name, (kind, new_loss) in new_forms.items():
        a, b = inputs(shape, kind)
        steps = []
        for loss in (old_forms[name][1], new_loss):
            step, block = compile_value_and_grad(lambda p, y, loss=loss: loss(p, y), False)
            block(step(a, b))  # compile
            steps.append((step, block))
        times = [[], []]
        for repeat in range(repeats):
            order = (0, 1) if repeat % 2 == 0 else (1, 0)  # neither always goes first
            for i in order:
                step, block = steps[i]
                start = time.perf_counter()
                block(step(a, b))
                times[i].append(time.perf_counter() - start)
        old_ms, new_ms = (1e3 * statistics.median(t) for t in times)
        same = None
        if programs and BACKEND == "jax":
            same = program_ops(steps[0][0], a, b) == program_ops(steps[1][0], a, b)
        ratios = sorted(n / o for n, o in zip(times[1], times[0], strict=True))
        rows[name] = {
            "old_ms": old_ms,
            "new_ms": new_ms,
            "new_over_old": new_ms / old_ms,
            "quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]],
            "same_program": same,
        }
        print(
            f"  {name:32s} old {old_ms:8.2f} ms  new {new_ms:8.2f} ms  "
            f"new/old {new_ms / old_ms:5.2f} (call by call {rows[name]['quartiles'][0]:.2f}"
            f"-{rows[name]['quartiles'][1]:.2f})"
            + ("" if same is None else f"  same program: {same}"),
            flush=True,
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="source tree of the other version")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sizes", nargs="+", default=["vocabulary"], choices=list(SIZES))
    parser.add_argument("--programs", action="store_true", help="JAX: compare XLA programs")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    old = load_old(args.old)
    results = {"backend": BACKEND, "keras": keras.__version__, "sizes": {}}
    for size in args.sizes:
        print(f"{size} {SIZES[size]} ({BACKEND})")
        rows = run(SIZES[size], old, args.repeats, args.programs)
        results["sizes"][size] = {"shape": SIZES[size], "rows": rows}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
