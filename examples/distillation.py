"""Distil a convolutional teacher into a small student on scikit-learn's digits.

The teacher (a small CNN) learns from 1200 digits; each student (one hidden layer of 16
units) sees only 200 of them with their labels, and the teacher's logits on those 200,
through `keras.distillation.Distiller`. The script trains the student alone, with Keras's
default `keras.distillation.LogitsDistillation()`, and with kl_keras's
`LogitsDistillation` for each divergence and temperature, all from the same initial
weights, and prints and plots their test accuracy on the last 597 digits.

    python examples/distillation.py [--epochs 60] [--out examples/output]

Runs on any Keras backend (set KERAS_BACKEND); nothing is downloaded.
"""

import argparse
import pathlib

import keras
import matplotlib
import numpy as np
from sklearn.datasets import load_digits

import kl_keras

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)


def data():
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
    labels = digits.target.astype("int32")
    return (
        (images[:1200], labels[:1200]),
        (images[:200], labels[:200]),
        (images[1200:], labels[1200:]),
    )


def teacher_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),  # logits
        ],
        name="teacher",
    )


def student_model():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10),  # logits
        ],
        name="student",
    )


def accuracy(model, x, y):
    return float(np.mean(np.argmax(keras.ops.convert_to_numpy(model(x)), axis=-1) == y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    (x_teacher, y_teacher), (x_train, y_train), (x_test, y_test) = data()
    labels_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher = teacher_model()
    teacher.compile(keras.optimizers.Adam(1e-3), loss=labels_loss)
    teacher.fit(x_teacher, y_teacher, epochs=args.teacher_epochs, batch_size=32, verbose=0)
    teacher.trainable = False
    teacher_accuracy = accuracy(teacher, x_test, y_test)
    print(f"backend {keras.backend.backend()}: teacher test accuracy {teacher_accuracy:.3f}")

    initial = student_model().get_weights()

    def fresh_student():
        student = student_model()
        student.set_weights(initial)
        return student

    student = fresh_student()
    student.compile(keras.optimizers.Adam(1e-2), loss=labels_loss)
    student.fit(x_train, y_train, epochs=args.epochs, batch_size=32, verbose=0)
    results = {"student alone": accuracy(student, x_test, y_test)}

    contenders = {"Keras LogitsDistillation() (T=3)": keras.distillation.LogitsDistillation()}
    for divergence in ("kl", "reverse_kl", "jensen_shannon"):
        for temperature in (1.0, 4.0):
            name = f"kl_keras {divergence} T={temperature:g}"
            contenders[name] = kl_keras.LogitsDistillation(temperature, divergence)
    for name, distillation in contenders.items():
        student = fresh_student()
        distiller = keras.distillation.Distiller(
            teacher, student, distillation_losses=distillation, student_loss_weight=0.5
        )
        distiller.compile(keras.optimizers.Adam(1e-2), loss=labels_loss)
        distiller.fit(x_train, y_train, epochs=args.epochs, batch_size=32, verbose=0)
        results[name] = accuracy(student, x_test, y_test)

    print(f"student test accuracy on {len(x_test)} digits ({len(x_train)} for training):")
    for name, value in results.items():
        print(f"  {name:<36}{value:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(8, 4))
    names = list(results)
    colors = ["gray", "tab:red"] + ["tab:blue"] * (len(names) - 2)
    axis.barh(names, [results[n] for n in names], color=colors)
    axis.invert_yaxis()
    axis.set_xlim(min(results.values()) - 0.05, 1.0)
    axis.set_xlabel("student test accuracy")
    axis.set_title(f"Distilling a CNN into a 16-unit MLP on digits ({keras.backend.backend()})")
    figure.tight_layout()
    path = args.out / "distillation_accuracy.png"
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
