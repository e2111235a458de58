"""Cost of the monitoring state in a training step: KL layers with and without statistics.

    KERAS_BACKEND=tensorflow python benchmarks/bench_monitor.py [--repeats 50] [--json out.json]

Copies of one sparse autoencoder, Dense(256, "sigmoid") -> Dense(784), differ only in how
the sparsity penalty enters: a `KLActivityRegularizer` (no state), a
`KLActivityRegularization` layer that accumulates KLMonitor's statistics (what ships),
and the same layer with its statistics switched off. Likewise a VAE, Dense(256) ->
2 x Dense(32) -> VariationalSampling -> Dense(784), with and without the statistics.
Their compiled `train_on_batch` steps run interleaved in one process, in alternating order;
the report gives medians and ratios. Nothing here asserts a timing.
"""

import argparse
import json
import statistics
import time

import keras
import numpy as np

import kl_keras


class SparsityWithoutStatistics(kl_keras.KLActivityRegularization):
    def _accumulate(self, *args):
        pass


class SamplingWithoutStatistics(kl_keras.VariationalSampling):
    def _accumulate(self, *args):
        pass


def sparse_autoencoder(kind):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    regularizer = kl_keras.KLActivityRegularizer(0.05, 0.1) if kind == "regularizer" else None
    hidden = keras.layers.Dense(256, activation="sigmoid", activity_regularizer=regularizer)(inputs)
    if kind == "layer":
        hidden = kl_keras.KLActivityRegularization(0.05, 0.1)(hidden)
    elif kind == "layer without statistics":
        hidden = SparsityWithoutStatistics(0.05, 0.1)(hidden)
    return keras.Model(inputs, keras.layers.Dense(784)(hidden))


def vae(kind):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((784,))
    hidden = keras.layers.Dense(256, activation="relu")(inputs)
    mean, log_var = keras.layers.Dense(32)(hidden), keras.layers.Dense(32)(hidden)
    sampling = kl_keras.VariationalSampling if kind == "layer" else SamplingWithoutStatistics
    z = sampling(beta=kl_keras.schedules.LinearWarmup(1000), seed=0)([mean, log_var])
    return keras.Model(inputs, keras.layers.Dense(784)(z))


MODELS = {
    "sparse: KLActivityRegularizer": lambda: sparse_autoencoder("regularizer"),
    "sparse: KLActivityRegularization": lambda: sparse_autoencoder("layer"),
    "sparse: layer, no statistics": lambda: sparse_autoencoder("layer without statistics"),
    "vae: VariationalSampling": lambda: vae("layer"),
    "vae: layer, no statistics": lambda: vae("layer without statistics"),
}
# monitored -> unmonitored
RATIOS = {
    "sparse: KLActivityRegularization": "sparse: layer, no statistics",
    "vae: VariationalSampling": "vae: layer, no statistics",
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    x = np.random.default_rng(0).random((args.batch_size, 784)).astype("float32")
    models = {name: make() for name, make in MODELS.items()}
    for model in models.values():
        model.compile(keras.optimizers.Adam(1e-3), keras.losses.MeanSquaredError())
        model.train_on_batch(x, x)  # compile and warm up
    times = {name: [] for name in models}
    names = list(models)
    for repeat in range(args.repeats):
        # Alternate the order: a step right after another model's runs slower on a busy
        # cache, which would otherwise favour a fixed position.
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            models[name].train_on_batch(x, x)
            times[name].append(time.perf_counter() - start)

    rows = {name: {"median_ms": 1e3 * statistics.median(t)} for name, t in times.items()}
    for monitored, baseline in RATIOS.items():
        rows[monitored]["x_unmonitored"] = (
            rows[monitored]["median_ms"] / rows[baseline]["median_ms"]
        )
    regularizer = rows["sparse: KLActivityRegularizer"]["median_ms"]
    rows["sparse: KLActivityRegularization"]["x_regularizer"] = (
        rows["sparse: KLActivityRegularization"]["median_ms"] / regularizer
    )
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, batch {args.batch_size}")
    for name, row in rows.items():
        ratios = "  ".join(f"{v:.3f}x {k[2:]}" for k, v in row.items() if k.startswith("x_"))
        print(f"  {name:<36}{row['median_ms']:8.2f} ms  {ratios}")
    if args.json:
        result = {
            "backend": keras.backend.backend(),
            "keras": keras.__version__,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
