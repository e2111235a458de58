"""Distil a byte-level language model into a smaller one with `SequenceDistiller`.

The text is Python's own help topics (`pydoc_data.topics`, about 466 KB, shipped with
Python), one line per sequence, cut to 64 bytes and padded: the padding mask is the sample
weight, so padding is neither learnt nor counted. A teacher (causal convolutions, 128 wide)
learns from nine tenths of the lines; each student (32 wide) sees only a small subset of them:
alone (its own next-byte cross-entropy) and distilled with `kl_keras.SequenceDistiller` (the
teacher's distribution at every real byte, through the fused, chunked loss), from the same
initial weights, and offline: the teacher's top-k bytes written once to files
(`teacher_top_k`, k = 8 and 64) and a student trained from them (`TopKDataset`,
`SequenceDistiller(None, student)`), with each tail. The script prints each model's
validation bits per byte on the last tenth and the files' size, plots them, then measures
the peak memory of three training steps of the fused loss and of the dense one
(`keras.distillation.Distiller`, both models' full logits) at a 32768-entry vocabulary, each
in a fresh process.

    python examples/sequence_distillation.py [--epochs 8] [--out examples/output]

Runs on any Keras backend (set KERAS_BACKEND); nothing is downloaded.
"""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import matplotlib
import numpy as np

import kl_keras
from kl_keras.distillation import TopKDataset, teacher_top_k

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

LENGTH = 64  # bytes per sequence
# glibc keeps freed blocks below a threshold that grows with the blocks freed, so a
# process's resident memory can stay above what it holds; a fixed threshold returns every
# freed block of 1 MB or more at once, and the peak is that of the buffers alive together.
MEASURE_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def data():
    """(x, y, mask) of the training and validation lines: bytes, next bytes, real-byte mask."""
    from pydoc_data.topics import topics

    lines = [line for line in "".join(topics.values()).encode().split(b"\n") if line.strip()]
    tokens = np.zeros((len(lines), LENGTH + 1), "int32")
    mask = np.zeros((len(lines), LENGTH), "float32")
    for i, line in enumerate(lines):
        line = line[: LENGTH + 1]
        tokens[i, : len(line)] = list(line)
        mask[i, : len(line) - 1] = 1.0
    x, y = tokens[:, :-1], tokens[:, 1:]
    split = len(lines) * 9 // 10
    return (x[:split], y[:split], mask[:split]), (x[split:], y[split:], mask[split:])


def language_model(width, layers, vocabulary=256, name=None):
    """Embedding, causal convolutions, and a `Dense` head (what `SequenceDistiller` splits)."""
    model = keras.Sequential([keras.Input((LENGTH,), dtype="int32")], name=name)
    model.add(keras.layers.Embedding(vocabulary, width))
    for i in range(layers):
        model.add(
            keras.layers.Conv1D(width, 4, padding="causal", dilation_rate=2**i, activation="relu")
        )
    model.add(keras.layers.Dense(vocabulary))  # the head: logits
    return model


def bits_per_byte(model, x, y, mask):
    logits = keras.ops.convert_to_numpy(model.predict(x, batch_size=256, verbose=0))
    logits = logits.astype("float64")
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
    nats = log_z - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
    return float((nats * mask).sum() / mask.sum() / math.log(2))


def measure(contender, vocabulary, tokens):
    """The peak resident memory (GB) that training steps add to this process.

    From before the first step, compilation included: TensorFlow keeps the memory of the
    first step for the next ones, so a peak taken after it would miss what a step needs.
    """
    batch = tokens // LENGTH
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(batch, LENGTH)).astype("int32")
    y = np.roll(x, -1, axis=1)
    teacher = language_model(128, 3, vocabulary)
    student = language_model(32, 2, vocabulary)
    if contender == "fused":
        model = kl_keras.SequenceDistiller(teacher, student, chunk_size=256)
        model.compile(keras.optimizers.Adam(1e-3))
    else:
        teacher.trainable = False
        model = keras.distillation.Distiller(
            teacher,
            student,
            distillation_losses=kl_keras.LogitsDistillation(),
            student_loss_weight=0.0,
        )
        model.compile(keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (Linux): what follows is the steps alone
    baseline = resident("VmRSS")
    for _ in range(3):
        model.train_on_batch(x, y)
    return (resident("VmHWM") - baseline) / 1e9


def resident(field):
    """VmRSS (now) or VmHWM (the peak since the reset), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=4)
    parser.add_argument("--subset", type=int, default=800, help="lines the students see")
    parser.add_argument("--top-k", type=int, nargs="*", default=[8, 64], help="offline runs")
    parser.add_argument("--vocabulary", type=int, default=32768, help="for the memory measure")
    parser.add_argument("--tokens", type=int, default=2048, help="for the memory measure")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    parser.add_argument("--measure", choices=("fused", "dense"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print("RESULT", json.dumps(measure(args.measure, args.vocabulary, args.tokens)))
        return

    keras.utils.set_random_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    (x, y, mask), validation = data()
    labels_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher = language_model(128, 3, name="teacher")
    teacher.compile(
        keras.optimizers.Adam(3e-3),
        loss=labels_loss,
    )
    teacher.fit(x, y, sample_weight=mask, epochs=args.teacher_epochs, batch_size=64, verbose=0)
    results = {"teacher": bits_per_byte(teacher, *validation)}

    subset = slice(0, args.subset)
    same_data = dict(
        x=x[subset],
        y=y[subset],
        sample_weight=mask[subset],
        epochs=args.epochs,
        batch_size=32,
        verbose=0,
    )  # for both students
    initial = language_model(32, 2).get_weights()

    def fresh_student():
        student = language_model(32, 2, name="student")
        student.set_weights(initial)
        return student

    student = fresh_student()
    student.compile(
        keras.optimizers.Adam(3e-3),
        loss=labels_loss,
    )
    student.fit(**same_data)
    results["student alone"] = bits_per_byte(student, *validation)

    student = fresh_student()
    distiller = kl_keras.SequenceDistiller(teacher, student, chunk_size=512)
    distiller.compile(keras.optimizers.Adam(3e-3))
    distiller.fit(**same_data)
    results["student distilled"] = bits_per_byte(student, *validation)
    np.savez(  # for benchmarks/top_k_bias.py: the teacher's and this student's logits
        args.out / "sequence_logits.npz",
        teacher=keras.ops.convert_to_numpy(teacher.predict(validation[0], verbose=0)),
        student=keras.ops.convert_to_numpy(student.predict(validation[0], verbose=0)),
        mask=validation[2],
    )

    # Offline: the teacher's top-k written once to files, a student trained from them.
    disk = {}
    for k in args.top_k:
        batches = [
            (x[subset][i : i + 32], None, mask[subset][i : i + 32])
            for i in range(0, len(x[subset]), 32)
        ]
        path = teacher_top_k(teacher, batches, k=k, path=args.out / f"top_{k}")
        disk[k] = sum(f.stat().st_size for f in path.glob("shard-*.npz")) / mask[subset].size
        for tail in ("bucket", "renormalize"):
            student = fresh_student()
            offline = kl_keras.SequenceDistiller(None, student, chunk_size=512, tail=tail)
            offline.compile(keras.optimizers.Adam(3e-3))
            offline.fit(TopKDataset(path), epochs=args.epochs, verbose=0)
            results[f"student distilled from top-{k} files, {tail}"] = bits_per_byte(
                student, *validation
            )

    real = int(validation[2].sum())
    print(f"backend {keras.backend.backend()}: students trained on {args.subset} lines")
    print(f"validation bits per byte ({real} bytes):")
    for name, value in results.items():
        print(f"  {name:<52}{value:.3f}")
    for k, size in disk.items():
        print(f"top-{k} files: {size:.0f} bytes a byte of text (inputs included)")

    memory = {}
    for contender, label in (
        ("fused", "fused (kl_keras.SequenceDistiller)"),
        ("dense", "dense (keras.distillation.Distiller)"),
    ):
        command = [sys.executable, __file__, "--measure", contender]
        command += ["--vocabulary", str(args.vocabulary), "--tokens", str(args.tokens)]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
            env={**os.environ, **MEASURE_ENVIRONMENT},
        )
        result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        memory[label] = json.loads(result[-1][len("RESULT ") :])
    print(f"peak memory of training steps, GB ({args.tokens} tokens, V={args.vocabulary}):")
    for name, value in memory.items():
        print(f"  {name:<52}{value:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4))
    colors = ["gray", "tab:red", "tab:blue"] + ["tab:cyan"] * (len(results) - 3)
    left.barh(list(results), list(results.values()), color=colors)
    left.invert_yaxis()
    left.set_xlabel("validation bits per byte")
    right.barh(list(memory), list(memory.values()), color=["tab:blue", "tab:red"])
    right.invert_yaxis()
    right.set_xlabel(f"peak memory of a step, GB (V={args.vocabulary})")
    figure.suptitle(f"Distilling a byte-level language model ({keras.backend.backend()})")
    figure.tight_layout()
    path = args.out / "sequence_distillation.png"
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
