"""Long runs on adversarial inputs stay finite and keep learning (2,000 steps each)."""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import to_numpy
from sklearn.datasets import load_digits

import kl_keras

pytestmark = pytest.mark.slow  # end to end; the minimum-Keras CI run skips it

STEPS_PER_EPOCH, EPOCHS, BATCH = 100, 20, 16  # 2,000 steps


def digits(n):
    data = load_digits()
    x = (data.data[:n] / 16.0).astype("float32")
    return x, np.eye(10, dtype="float32")[data.target[:n]]


def train(model, x, y, optimizer):
    keras.utils.set_random_seed(0)
    model.compile(optimizer, loss=kl_keras.KLDivergence(from_logits=True))
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, verbose=0).history[
        "loss"
    ]
    assert len(history) == EPOCHS and len(x) // BATCH == STEPS_PER_EPOCH
    return np.array(history)


def test_adversarially_scaled_logits_with_one_hot_targets():
    x, y = digits(STEPS_PER_EPOCH * BATCH)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    logits = keras.layers.Rescaling(1e4)(keras.layers.Dense(10)(inputs))  # logits ~ 1e4
    model = keras.Model(inputs, logits)
    losses = train(model, x, y, keras.optimizers.SGD(1e-6))
    assert np.all(np.isfinite(losses)), losses
    assert losses[0] > 1e3  # confidently wrong at the start: KL in the thousands
    assert losses[-1] < 0.1 * losses[0], losses
    assert np.all(np.diff(losses[:5]) < 0), losses  # it is learning from the first epochs


@pytest.mark.parametrize(
    "activation, bias, start",
    [
        # sigmoid(8) = 0.99966: saturated, yet with a gradient float32 can carry.
        ("sigmoid", 8.0, 32 * ref.bernoulli_kl(0.05, 1 / (1 + np.exp(-8.0)))),
        # ReLU outputs near 8: rho_hat far above 1, clipped to 1 - 1e-7 with its gradient kept.
        ("relu", 8.0, 32 * ref.bernoulli_kl(0.05, 1 - 1e-7)),
    ],
)
def test_regularizer_on_saturating_activations(activation, bias, start):
    x, y = digits(STEPS_PER_EPOCH * BATCH)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(
        32,
        activation=activation,
        bias_initializer=keras.initializers.Constant(bias),
        activity_regularizer=kl_keras.KLActivityRegularizer(rho=0.05, beta=1.0),
        name="hidden",
    )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(10)(hidden))
    encoder = keras.Model(inputs, hidden)
    penalty = float(to_numpy(model.get_layer("hidden").activity_regularizer.penalty(encoder(x))))
    assert 0.9 * start < penalty <= start * (1 + 1e-5)  # saturated at the start
    losses = train(model, x, y, keras.optimizers.Adam(1e-3))
    assert np.all(np.isfinite(losses)), losses
    # Training pulls the units out of saturation and keeps improving to the end.
    assert losses[-1] < 0.1 * losses[0], (losses, start)
    assert np.mean(losses[-5:]) < np.mean(losses[5:10]), losses
