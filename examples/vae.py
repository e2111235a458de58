"""A variational autoencoder on scikit-learn's 8x8 digits with VariationalSampling.

No custom train_step: the reconstruction loss goes to `compile`, the KL term comes
from the VariationalSampling layer, which adds beta * KL(q(z|x) ‖ N(0, I)) to the
model's losses. The script trains the same VAE three ways, with a constant beta,
with a cyclical beta schedule (Fu et al. 2019), and with a constant beta and free
bits (Kingma et al. 2016), and prints for each the reconstruction term, the KL and
the number of active latent units (Burda et al. 2016: Cov_x(E_q[z_j]) > 0.01).
KLMonitor logs the KL, the active units and beta every epoch. It writes three PNGs:
the latent means of the test digits coloured by digit (the two most active
dimensions), a grid of digits decoded from samples of the prior, and the active
units and beta per epoch of each run.

    python examples/vae.py [--epochs 100] [--latent 16] [--out examples/output]

Runs on any Keras backend (set KERAS_BACKEND); the digits ship inside
scikit-learn, so nothing is downloaded.
"""

import argparse
import pathlib

import keras
import matplotlib
import numpy as np
from keras import ops
from sklearn.datasets import load_digits

import kl_keras

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

PIXELS = 64


def reconstruction(y_true, y_pred):
    """-log p(x|z) of 64 Bernoulli pixels: summed over the pixels, one value per image.

    Summed, not averaged: the KL is per image too, so beta = 1 is the evidence lower
    bound. Keras's binary_crossentropy averages over the last axis.
    """
    return PIXELS * keras.losses.binary_crossentropy(y_true, y_pred)


def build(latent_dim, beta, free_bits):
    inputs = keras.Input((PIXELS,), name="pixels")
    hidden = keras.layers.Dense(128, activation="relu")(inputs)
    mean = keras.layers.Dense(latent_dim, name="mean")(hidden)
    log_var = keras.layers.Dense(latent_dim, name="log_var")(hidden)
    z = kl_keras.VariationalSampling(beta, free_bits, seed=0, name="z")([mean, log_var])
    decoder = keras.Sequential(
        [
            keras.Input((latent_dim,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(PIXELS, activation="sigmoid"),
        ],
        name="decoder",
    )
    vae = keras.Model(inputs, decoder(z), name="vae")
    vae.compile(keras.optimizers.Adam(2e-3), loss=reconstruction)
    encoder = keras.Model(inputs, mean, name="encoder")
    return vae, encoder, decoder


def evaluate(vae, encoder, x):
    """The reconstruction term, the KL (nats per image) and the active units on `x`."""
    z_mean = ops.convert_to_numpy(encoder.predict(x, verbose=0))
    recon = float(np.mean(ops.convert_to_numpy(reconstruction(x, vae.predict(x, verbose=0)))))
    log_var_model = keras.Model(vae.input, vae.get_layer("log_var").output)
    log_var = log_var_model.predict(x, verbose=0)
    kl = float(np.mean(ops.convert_to_numpy(kl_keras.gaussian_kl_divergence(z_mean, log_var))))
    activity = np.var(z_mean, axis=0)  # Cov_x(E_q[z_j]) for each latent dimension j
    return recon, kl, int(np.sum(activity > 0.01)), activity, z_mean


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--latent", type=int, default=16, help="latent dimensions")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args()

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")  # 1797 images, pixels in [0, 1]
    x_train, x_test, labels_test = x[:1500], x[1500:], digits.target[1500:]
    batch_size = 50
    steps_per_epoch = len(x_train) // batch_size
    runs = {
        "constant beta=1": (1.0, 0.0),
        "cyclical beta 0->1": (
            kl_keras.schedules.CyclicalAnnealing(cycle_steps=10 * steps_per_epoch, ratio=0.5),
            0.0,
        ),
        "beta=1, free bits 0.5": (1.0, 0.5),
    }
    print(f"Training a VAE on {len(x_train)} digits, backend {keras.backend.backend()}")
    results = {}
    for name, (beta, free_bits) in runs.items():
        keras.utils.set_random_seed(0)
        vae, encoder, decoder = build(args.latent, beta, free_bits)
        history = vae.fit(
            x_train,
            x_train,
            batch_size=batch_size,
            epochs=args.epochs,
            callbacks=[kl_keras.callbacks.KLMonitor()],  # z_kl, z_active_units, z_beta
            verbose=0,
        ).history
        results[name] = (*evaluate(vae, encoder, x_test), decoder, history)

    print(f"\nOn {len(x_test)} test digits (nats per image):")
    print(f"  {'':24s}{'reconstruction':>16s}{'KL':>8s}{'active units':>14s}")
    for name, (recon, kl, active, *_) in results.items():
        print(f"  {name:24s}{recon:16.2f}{kl:8.2f}{active:>8d} of {args.latent}")

    args.out.mkdir(parents=True, exist_ok=True)
    name = "cyclical beta 0->1"
    _, _, _, activity, z_mean, decoder, _ = results[name]
    first, second = np.argsort(activity)[::-1][:2]
    fig, ax = plt.subplots(figsize=(6, 5))
    points = ax.scatter(z_mean[:, first], z_mean[:, second], c=labels_test, cmap="tab10", s=8)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel(f"E_q[z_{first}]")
    ax.set_ylabel(f"E_q[z_{second}]")
    ax.set_title(f"Test digits' latent means, two most active dimensions\n({name})")
    fig.tight_layout()
    fig.savefig(args.out / "vae_latent_space.png", dpi=100)
    plt.close(fig)

    prior_samples = np.random.default_rng(0).standard_normal((100, args.latent))
    images = decoder.predict(prior_samples.astype("float32"), verbose=0).reshape(10, 10, 8, 8)
    images = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))  # a blank frame around each
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(images.transpose(0, 2, 1, 3).reshape(100, 100), cmap="gray_r")
    ax.set_axis_off()
    ax.set_title(f"Digits decoded from z ~ N(0, I)\n({name})")
    fig.tight_layout()
    fig.savefig(args.out / "vae_samples.png", dpi=100)
    plt.close(fig)

    epochs = np.arange(1, args.epochs + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, result in results.items():
        history = result[-1]
        left.plot(epochs, history["z_active_units"], label=name)
        right.plot(epochs, history["z_beta"], label=name)
    left.set_xlabel("epoch")
    left.set_ylabel(f"active units of {args.latent} (training)")
    left.legend(fontsize=8)
    right.set_xlabel("epoch")
    right.set_ylabel("beta at the end of the epoch")
    fig.tight_layout()
    fig.savefig(args.out / "vae_active_units.png", dpi=100)
    plt.close(fig)
    written = ", ".join(str(args.out / f"vae_{n}.png") for n in ("latent_space", "samples"))
    print(f"\nwrote {written} and {args.out / 'vae_active_units.png'}")


if __name__ == "__main__":
    main()
