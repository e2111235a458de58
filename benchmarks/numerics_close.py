"""Relative error of KL for close distributions, kl_keras and its peers side by side.

Not a timing: each number is max over rows of |value - exact| / exact, where "exact" is
computed in long double from the same float32 inputs (so input rounding is not counted).
Logits `t = 3·N(0, 1) + c` of shape (8, V), `s = t + σ·N(0, 1)`, both float32.

    KERAS_BACKEND=jax python benchmarks/numerics_close.py [--json results/numerics_jax.json]

Columns: kl_keras's `LogitsDistillation()(t, s)` (logits against logits) and
`kl_divergence(softmax(t), s, from_logits=True)` (a float32 probability target), the
textbook log-softmax difference in float32 on this backend (what kl_keras 0.2 and most
code compute), `torch.nn.functional.kl_div(log_softmax(s), log_softmax(t),
log_target=True)` and `optax.losses.kl_divergence_with_log_targets` where installed.
"""

import argparse
import json
import os

import keras
import numpy as np

import kl_keras

LD = np.longdouble
GRID = [  # (sigma, vocabulary, offset)
    (0.05, 32000, 0.0),
    (0.05, 32000, 100.0),
    (0.05, 32000, 1000.0),
    (2e-3, 32000, 0.0),
    (2e-3, 32000, 30.0),
    (2e-3, 262144, 30.0),
    (1e-4, 32000, 0.0),
]


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def exact_kl(t, s):
    lp, lq = log_softmax(LD(t)), log_softmax(LD(s))
    return np.sum(np.exp(lp) * (lp - lq), axis=-1)


def error(value, exact):
    return float(np.max(np.abs(np.asarray(value, LD) - exact) / exact))


def peers(t, s):
    found = {}
    try:
        import torch
        import torch.nn.functional as F

        lt = F.log_softmax(torch.from_numpy(t), -1)
        ls = F.log_softmax(torch.from_numpy(s), -1)
        found["F.kl_div"] = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1).numpy()
    except ImportError:
        pass
    try:
        import jax
        import optax

        found["optax"] = np.asarray(
            optax.losses.kl_divergence_with_log_targets(
                jax.nn.log_softmax(s, -1), jax.nn.log_softmax(t, -1)
            )
        )
    except ImportError:
        pass
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ops = keras.ops
    rows = []
    for sigma, vocabulary, offset in GRID:
        t = (3.0 * rng.normal(size=(8, vocabulary)) + offset).astype("float32")
        s = (t + sigma * rng.normal(size=t.shape)).astype("float32")
        exact = exact_kl(t, s)
        p = np.exp(log_softmax(LD(t))).astype("float32")
        lp = ops.log_softmax(t, axis=-1)
        textbook = ops.sum(ops.exp(lp) * (lp - ops.log_softmax(s, axis=-1)), axis=-1)
        row = {
            "sigma": sigma,
            "vocabulary": vocabulary,
            "offset": offset,
            "kl": float(np.mean(exact)),
            "LogitsDistillation": error(
                ops.convert_to_numpy(kl_keras.LogitsDistillation(reduction="none")(t, s)), exact
            ),
            "kl_divergence(p, logits)": error(
                ops.convert_to_numpy(kl_keras.kl_divergence(p, s, from_logits=True)), exact
            ),
            "log-softmax difference": error(ops.convert_to_numpy(textbook), exact),
        }
        row.update({name: error(value, exact) for name, value in peers(t, s).items()})
        rows.append(row)
        print(
            f"σ={sigma:g} V={vocabulary} c={offset:g} KL={row['kl']:.1e}  "
            + "  ".join(f"{k}: {v:.1e}" for k, v in row.items() if k not in GRID_KEYS),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": keras.backend.backend(), "rows": rows}, f, indent=1)
            f.write("\n")


GRID_KEYS = ("sigma", "vocabulary", "offset", "kl")

if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
