"""Cost of KLActivityRegularizer in a training step, against L1 and no activity regularizer.

    KERAS_BACKEND=tensorflow python benchmarks/bench_regularizer.py [--repeats 50] [--json out.json]

Three copies of the same autoencoder, Dense(256, "sigmoid") -> Dense(784), differ only
in the hidden layer's activity regularizer. Their compiled `train_on_batch` steps run
interleaved in one process; the report gives medians and ratios. Nothing here asserts
a timing.
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np

import kl_keras

REGULARIZERS = {
    "KLActivityRegularizer": lambda: kl_keras.KLActivityRegularizer(rho=0.05, beta=0.1),
    "L1": lambda: keras.regularizers.L1(1e-4),
    "none": lambda: None,
}


def build(regularizer):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(256, activation="sigmoid", activity_regularizer=regularizer)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(784)(hidden))
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError())
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    x = np.random.default_rng(0).random((args.batch_size, 784)).astype("float32")
    models = {name: build(make()) for name, make in REGULARIZERS.items()}
    for model in models.values():
        model.train_on_batch(x, x)  # compile and warm up
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, x)
            times[name].append(time.perf_counter() - start)

    rows = {name: {"median_ms": 1e3 * statistics.median(t)} for name, t in times.items()}
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, batch {args.batch_size}")
    for name, row in rows.items():
        print(
            f"  {name:<24}{row['median_ms']:8.2f} ms  "
            f"{row['median_ms'] / rows['L1']['median_ms']:.2f}x L1  "
            f"{row['median_ms'] / rows['none']['median_ms']:.2f}x none"
        )
    if args.json:
        result = {
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "model": 'Dense(256, "sigmoid") -> Dense(784), Adam, MSE',
            "batch_size": args.batch_size,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
