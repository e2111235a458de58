"""Train a sparse autoencoder on scikit-learn's 8x8 digits with KLActivityRegularization.

The hidden layer's mean activation is pushed toward rho by the penalty
beta * sum_j KL(rho ‖ rho_hat_j), which a KLActivityRegularization layer after the
sigmoid adds to the model's losses. KLMonitor puts rho_hat (mean, min, max over the
units), the fraction of dead units, the penalty and beta in the progress bar each
epoch. The script prints the target rho next to the mean activation reached, with
and without the penalty, and writes three PNGs: the features the hidden units
learned, the histogram of their activations, and rho_hat and dead units per epoch.

    python examples/sparse_autoencoder.py [--epochs 40] [--out examples/output]

Runs on any Keras backend (set KERAS_BACKEND); the digits ship inside
scikit-learn, so nothing is downloaded.
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


def build(hidden_units, rho, beta):
    """The autoencoder and its encoder; `beta=None` builds it without the penalty."""
    inputs = keras.Input((64,), name="pixels")
    # Weight decay, as in Ng's notes, keeps the weights of the always-blank border
    # pixels small so that the features show strokes rather than their initial noise.
    code = keras.layers.Dense(
        hidden_units,
        activation="sigmoid",
        kernel_regularizer=keras.regularizers.L2(1e-3),
        name="hidden",
    )(inputs)
    if beta is not None:
        code = kl_keras.KLActivityRegularization(rho=rho, beta=beta, name="code")(code)
    outputs = keras.layers.Dense(64, activation="sigmoid", name="reconstruction")(code)
    autoencoder = keras.Model(inputs, outputs, name="sparse_autoencoder")
    autoencoder.compile(keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
    return autoencoder, keras.Model(inputs, code, name="encoder")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rho", type=float, default=0.05, help="target mean activation")
    parser.add_argument("--beta", type=float, default=0.5, help="weight of the penalty")
    parser.add_argument("--hidden", type=int, default=36, help="hidden units")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    x = (load_digits().data / 16.0).astype("float32")  # 1797 images, pixels in [0, 1]
    x_train, x_test = x[:1500], x[1500:]

    autoencoder, encoder = build(args.hidden, args.rho, args.beta)
    print(f"Training on {len(x_train)} digits, backend {keras.backend.backend()}")
    history = autoencoder.fit(
        x_train,
        x_train,
        batch_size=64,
        epochs=args.epochs,
        validation_data=(x_test, x_test),
        callbacks=[kl_keras.callbacks.KLMonitor()],  # code_rho_hat, code_dead_units, ...
        verbose=1,  # Keras progress bar
    ).history
    codes = np.asarray(encoder.predict(x_test, verbose=0))

    keras.utils.set_random_seed(0)
    dense_autoencoder, dense_encoder = build(args.hidden, args.rho, None)
    dense_autoencoder.fit(x_train, x_train, batch_size=64, epochs=args.epochs, verbose=0)
    dense_codes = np.asarray(dense_encoder.predict(x_test, verbose=0))

    print()
    print(f"target rho                            {args.rho:.4f}")
    print(f"mean hidden activation, with penalty  {codes.mean():.4f}")
    print(f"mean hidden activation, no penalty    {dense_codes.mean():.4f}")
    penalty = kl_keras.KLActivityRegularizer(rho=args.rho, beta=args.beta).penalty(codes)
    print(f"penalty on the test set               {float(penalty):.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    kernel = np.asarray(encoder.get_layer("hidden").kernel)  # (64, hidden)
    columns = int(np.ceil(np.sqrt(args.hidden)))
    rows = int(np.ceil(args.hidden / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.1, rows * 1.1))
    for unit, axis in enumerate(axes.flat):
        axis.axis("off")
        if unit < args.hidden:
            axis.imshow(kernel[:, unit].reshape(8, 8), cmap="gray")
    figure.suptitle(f"Features of {args.hidden} hidden units (rho={args.rho}, beta={args.beta})")
    features_path = args.out / "sparse_autoencoder_features.png"
    figure.savefig(features_path, dpi=120)

    figure, axis = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    axis.hist(dense_codes.ravel(), bins=bins, alpha=0.6, label="no penalty")
    axis.hist(codes.ravel(), bins=bins, alpha=0.6, label="KLActivityRegularization")
    axis.axvline(args.rho, color="black", linestyle="--", label=f"rho = {args.rho}")
    axis.set_yscale("log")
    axis.set_xlabel("hidden activation on test digits")
    axis.set_ylabel("count")
    axis.legend()
    figure.tight_layout()
    histogram_path = args.out / "sparse_autoencoder_activations.png"
    figure.savefig(histogram_path, dpi=120)

    # What KLMonitor logged: rho_hat over each epoch's activations, and dead units.
    epochs = np.arange(1, args.epochs + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.fill_between(
        epochs,
        history["code_rho_hat_min"],
        history["code_rho_hat_max"],
        alpha=0.3,
        label="min to max over the units",
    )
    left.plot(epochs, history["code_rho_hat"], label="mean over the units (training)")
    left.plot(epochs, history["val_code_rho_hat"], label="mean over the units (test)")
    left.axhline(args.rho, color="black", linestyle="--", label=f"rho = {args.rho}")
    left.set_yscale("log")
    left.set_xlabel("epoch")
    left.set_ylabel("rho_hat_j")
    left.legend(fontsize=8)
    right.plot(epochs, np.array(history["code_dead_units"]) * args.hidden, label="training")
    right.plot(epochs, np.array(history["val_code_dead_units"]) * args.hidden, label="test")
    right.set_xlabel("epoch")
    right.set_ylabel("dead units (rho_hat_j < 1e-3)")
    right.set_ylim(-0.5, args.hidden)
    right.legend(fontsize=8)
    figure.tight_layout()
    monitor_path = args.out / "sparse_autoencoder_monitor.png"
    figure.savefig(monitor_path, dpi=120)
    print(f"wrote {features_path}, {histogram_path} and {monitor_path}")


if __name__ == "__main__":
    main()
