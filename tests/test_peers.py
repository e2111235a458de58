"""The README's mapping to torch.nn.functional.kl_div and optax.losses.kl_divergence holds.

Each test needs its peer's backend (the tensors are handed over directly), so it runs
in the CI pass of that backend.
"""

import keras
import numpy as np
import pytest
from helpers import BACKEND, to_numpy

from kl_keras import KLDivergence, kl_divergence

RNG = np.random.default_rng(11)
P = RNG.dirichlet(np.ones(7), size=5).astype("float32")
P[0, :3] = 0.0
P[0] /= P[0].sum()
LOGITS = RNG.normal(size=(5, 7)).astype("float32")


@pytest.mark.skipif(BACKEND != "torch", reason="compares with torch on the torch backend")
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
@pytest.mark.parametrize(
    "torch_reduction, ours",
    [
        ("batchmean", lambda p, z: KLDivergence(from_logits=True)(p, z)),
        ("sum", lambda p, z: KLDivergence(from_logits=True, reduction="sum")(p, z)),
        ("mean", lambda p, z: KLDivergence(from_logits=True)(p, z) / p.shape[-1]),
        ("none", lambda p, z: kl_divergence(p, z, from_logits=True)),
    ],
)
def test_torch_kl_div_mapping(torch_reduction, ours):
    import torch
    import torch.nn.functional as F

    p, z = torch.tensor(P), torch.tensor(LOGITS)
    theirs = F.kl_div(F.log_softmax(z, dim=-1), p, reduction=torch_reduction)
    if torch_reduction == "none":  # torch keeps the class axis
        theirs = theirs.sum(dim=-1)
    np.testing.assert_allclose(to_numpy(ours(p, z)), theirs.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(BACKEND != "jax", reason="compares with optax on the jax backend")
def test_optax_kl_divergence_mapping():
    optax = pytest.importorskip("optax")
    import jax

    theirs = optax.losses.kl_divergence(jax.nn.log_softmax(LOGITS), P)
    ours = kl_divergence(P, LOGITS, from_logits=True)
    np.testing.assert_allclose(to_numpy(ours), np.asarray(theirs), rtol=1e-5, atol=1e-7)
    # The probabilities path with the same direction: optax takes log(q) first.
    q = np.asarray(jax.nn.softmax(LOGITS))
    theirs = optax.losses.kl_divergence(np.log(q), P)
    np.testing.assert_allclose(
        to_numpy(kl_divergence(P, q)), np.asarray(theirs), rtol=1e-5, atol=1e-7
    )


def test_keras_kl_divergence_direction():
    # Same direction and argument order as keras.losses.kl_divergence: KL(y_true ‖ y_pred).
    q = RNG.dirichlet(np.ones(7), size=5).astype("float32")
    p = RNG.dirichlet(np.ones(7), size=5).astype("float32")
    np.testing.assert_allclose(
        to_numpy(kl_divergence(p, q)), to_numpy(keras.losses.kl_divergence(p, q)), rtol=1e-6
    )


@pytest.mark.skipif(BACKEND != "torch", reason="compares with torch on the torch backend")
def test_torch_distributions_gaussian_kl_mapping():
    # torch.distributions takes standard deviations: scale = exp(log_var / 2).
    import torch
    from torch.distributions import Normal
    from torch.distributions import kl_divergence as torch_kl

    from kl_keras import gaussian_kl_divergence

    mean, log_var, prior_mean, prior_log_var = (
        torch.tensor(RNG.normal(size=(5, 7)).astype("float32")) for _ in range(4)
    )
    theirs = torch_kl(
        Normal(mean, torch.exp(log_var / 2)), Normal(prior_mean, torch.exp(prior_log_var / 2))
    ).sum(-1)
    ours = gaussian_kl_divergence(mean, log_var, prior_mean, prior_log_var)
    np.testing.assert_allclose(to_numpy(ours), theirs.numpy(), rtol=1e-5, atol=1e-7)
