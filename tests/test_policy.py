"""policy_kl, policy_kl_from_logits, PolicyKL: values against float64, the gradient table
of the docstring by enumeration and by Monte Carlo, clamps, masks, NaN, reductions.

The gradient table is proved on a categorical policy over V = 6 tokens, π = softmax(θ),
against a fixed reference: "used as a loss" means the samples are held fixed and the
estimate is differentiated with respect to θ through log π(x). By enumeration the
expected gradient is the gradient of sum_x stop_gradient(π(x)) · k(x); by Monte Carlo it
is the mean gradient over samples drawn with a fixed seed. Every other mode of autodiff
is in test_autodiff.py.
"""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import BACKEND, run_in_fresh_process, to_numpy, value_and_grad
from keras import ops

import kl_keras
from kl_keras.policy import sequence_policy_kl

policy_kl_from_logits = kl_keras.policy_kl_from_logits

V = 6
THETA = np.random.default_rng(0).normal(size=V).astype("float32")
REF_LOGITS = np.random.default_rng(1).normal(size=V).astype("float32")


def estimates64(name, log_probs, ref_log_probs):
    """The estimators in float64 from the same (float32) inputs."""
    log_r = np.float64(ref_log_probs) - np.float64(log_probs)
    return {
        "k1": -log_r,
        "k2": 0.5 * log_r**2,
        "k3": np.expm1(log_r) - log_r,
        "abs": np.abs(log_r),
    }[name]


def exact_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)))


def policy_and_reference():
    p = ref.softmax(np.float64(THETA))
    q = ref.softmax(np.float64(REF_LOGITS))
    return p, q


def gradient_of_reverse_kl():
    """d KL(π ‖ π_ref) / d θ."""
    p, q = policy_and_reference()
    return p * (np.log(p) - np.log(q) - exact_kl(p, q))


def gradient_of_forward_kl():
    """d KL(π_ref ‖ π) / d θ."""
    p, q = policy_and_reference()
    return p - q


def gradient_of_expected_k2():
    """d E_π[k2] / d θ, the k2 estimator's value averaged under π (not a KL)."""
    p, q = policy_and_reference()
    k2 = 0.5 * (np.log(q) - np.log(p)) ** 2
    # d/dθ_j sum_x p_x k2_x
    #   = sum_x p_x (δ_xj - p_j) k2_x + sum_x p_x (log p_x - log q_x) (δ_xj - p_j)
    return p * (k2 - np.sum(p * k2)) + gradient_of_reverse_kl()


def expected_gradient(estimator, weigh=None):
    """The gradient of sum_x stop_gradient(π(x)) · k(x) with respect to θ: the expected
    gradient under π of the estimate used as a loss."""

    def objective(theta):
        log_pi = ops.log_softmax(theta)
        ref_log_pi = ops.log_softmax(ops.convert_to_tensor(REF_LOGITS))
        pi = ops.stop_gradient(ops.exp(log_pi))
        ratio = None if weigh is None else ops.exp(log_pi - ops.stop_gradient(log_pi))
        k = kl_keras.policy_kl(log_pi, ref_log_pi, estimator, importance_ratio=ratio)
        return ops.sum(pi * k)

    _, (gradient,) = value_and_grad(objective, THETA)
    return gradient


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
@pytest.mark.parametrize("gap", [1.0, 1e-2, 1e-5], ids=["far", "close", "very-close"])
def test_values_against_float64(estimator, gap):
    rng = np.random.default_rng(2)
    log_probs = np.log(rng.uniform(0.05, 1.0, size=(4, 7))).astype("float32")
    ref_log_probs = (log_probs + gap * rng.normal(size=(4, 7))).astype("float32")
    actual = to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, estimator))
    expected = estimates64(estimator, log_probs, ref_log_probs)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=0)


def test_k3_keeps_its_digits_where_the_plain_formula_has_none():
    log_probs = np.full((3,), -2.0, "float32")
    ref_log_probs = log_probs + np.array([1e-4, -3e-5, 2e-6], "float32")
    expected = estimates64("k3", log_probs, ref_log_probs)  # about log_r² / 2
    actual = to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, "k3"))
    np.testing.assert_allclose(actual, expected, rtol=2e-6)
    log_r = ref_log_probs - log_probs
    plain = np.exp(log_r) - log_r - np.float32(1)  # what TRL's float32 line gives
    assert np.max(np.abs(plain - expected) / expected) > 0.5


@pytest.mark.parametrize(
    "alias, name", [("kl", "k1"), ("mse", "k2"), ("mse_kl", "k2"), ("low_var_kl", "k3")]
)
def test_verl_and_tunix_names_are_aliases(alias, name):
    log_probs, ref_log_probs = np.log([[0.3, 0.6]]), np.log([[0.5, 0.2]])
    for suffix in ("", "+"):
        np.testing.assert_array_equal(
            to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, alias + suffix)),
            to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, name + suffix)),
        )


def test_values_unbiased_where_the_literature_says():
    p, q = policy_and_reference()
    log_p, log_q = np.log(p).astype("float32"), np.log(q).astype("float32")
    kl = exact_kl(p, q)
    for estimator, unbiased in (("k1", True), ("k3", True), ("k2", False), ("abs", False)):
        expectation = np.sum(p * to_numpy(kl_keras.policy_kl(log_p, log_q, estimator)))
        if unbiased:
            np.testing.assert_allclose(expectation, kl, rtol=1e-5)
        else:
            assert abs(expectation - kl) > 1e-3 * kl  # biased at this distance


# ---------------------------------------------------------------- the gradient table


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", lambda: np.zeros(V)),
        ("k2", gradient_of_reverse_kl),
        ("k3", gradient_of_forward_kl),
        ("k1+", gradient_of_reverse_kl),
        ("k2+", gradient_of_reverse_kl),
        ("k3+", gradient_of_reverse_kl),
        ("abs+", gradient_of_reverse_kl),
    ],
)
def test_expected_gradient_as_a_loss(estimator, expected):
    np.testing.assert_allclose(expected_gradient(estimator), expected(), rtol=1e-5, atol=1e-7)
    assert np.max(np.abs(gradient_of_reverse_kl() - gradient_of_forward_kl())) > 1e-2


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", gradient_of_reverse_kl),
        ("k3", gradient_of_reverse_kl),
        ("k2", gradient_of_expected_k2),
        ("k3+", gradient_of_reverse_kl),
        ("k1+", gradient_of_reverse_kl),
    ],
)
def test_expected_gradient_with_an_importance_ratio(estimator, expected):
    # TRL's use_bias_correction_kl: the estimate times π / π_old, the ratio carrying the
    # gradient (here π_old = π, the on-policy point where the ratio is 1).
    np.testing.assert_allclose(
        expected_gradient(estimator, weigh=True), expected(), rtol=1e-5, atol=1e-7
    )


def test_k1_as_a_detached_reward_gives_the_reverse_kl_gradient():
    # REINFORCE: the penalty enters the reward, -β·k1(x), held constant, and the loss is
    # -reward · log π(x); its expected gradient is β ∇KL(π ‖ π_ref).
    def objective(theta):
        log_pi = ops.log_softmax(theta)
        ref_log_pi = ops.log_softmax(ops.convert_to_tensor(REF_LOGITS))
        reward = -ops.stop_gradient(kl_keras.policy_kl(log_pi, ref_log_pi, "k1"))
        return ops.sum(ops.stop_gradient(ops.exp(log_pi)) * -reward * log_pi)

    _, (gradient,) = value_and_grad(objective, THETA)
    np.testing.assert_allclose(gradient, gradient_of_reverse_kl(), rtol=1e-5, atol=1e-7)


def test_full_kl_gradient_is_exactly_the_reverse_kl_gradient():
    def objective(theta):
        return kl_keras.policy_kl_from_logits(theta[None], REF_LOGITS[None])[0]

    value, (gradient,) = value_and_grad(objective, THETA)
    p, q = policy_and_reference()
    np.testing.assert_allclose(value, exact_kl(p, q), rtol=2e-6)
    np.testing.assert_allclose(gradient, gradient_of_reverse_kl(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", lambda: np.zeros(V)),
        ("k2", gradient_of_reverse_kl),
        ("k3", gradient_of_forward_kl),
        ("k3+", gradient_of_reverse_kl),
    ],
)
def test_monte_carlo_gradient_agrees_with_the_table(estimator, expected):
    """Mean gradient over 20000 tokens sampled from π with a fixed seed, within five
    standard errors (from the per-token gradients by enumeration) of the expectation."""
    p, _ = policy_and_reference()
    samples = np.random.default_rng(3).choice(V, size=20000, p=p / p.sum())

    def per_token(theta, tokens):
        log_pi = ops.take(ops.log_softmax(theta), tokens)
        ref_log_pi = ops.take(ops.log_softmax(ops.convert_to_tensor(REF_LOGITS)), tokens)
        return kl_keras.policy_kl(log_pi, ref_log_pi, estimator)

    _, (mean_gradient,) = value_and_grad(lambda theta: ops.mean(per_token(theta, samples)), THETA)
    # Each token's own gradient, for the spread of the sample mean.
    gradients = np.stack(
        [
            value_and_grad(lambda theta, x=x: per_token(theta, np.array([x])), THETA)[1][0]
            for x in range(V)
        ]
    )
    spread = np.sqrt(np.sum(p[:, None] * (gradients - p @ gradients) ** 2, axis=0))
    standard_error = spread / np.sqrt(len(samples))
    np.testing.assert_array_less(np.abs(mean_gradient - expected()), 5 * standard_error + 1e-6)
    # ...and that sample tells the gradients of the two directions apart.
    assert np.max(np.abs(gradient_of_reverse_kl() - gradient_of_forward_kl()) / standard_error) > 10
    np.testing.assert_allclose(p @ gradients, expected(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- clamps, masks, NaN


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_clip_clamps_the_value_with_zero_gradient_outside(estimator):
    log_probs = np.array([-1.0, -1.0, -1.0, -1.0, -100.0, -1.0], "float32")
    ref_log_probs = np.array([-1.2, -0.9, -30.0, 30.0, -0.5, 200.0], "float32")
    clip = (-1.0, 2.0)

    def fn(log_probs):
        return kl_keras.policy_kl(log_probs, ref_log_probs, estimator, clip=clip)

    value, (gradient,) = value_and_grad(fn, log_probs)
    values = to_numpy(fn(log_probs))
    expected = estimates64(estimator, log_probs, ref_log_probs)
    np.testing.assert_allclose(values, np.clip(expected, *clip), rtol=2e-6)
    outside = (expected < clip[0]) | (expected > clip[1])
    assert outside.sum() >= 3  # the test covers the clamp
    assert np.all(np.isfinite(gradient))
    np.testing.assert_array_equal(gradient[outside], 0.0)
    assert np.all(gradient[~outside] != 0.0)


def test_clip_minus_ten_ten_reproduces_openrlhf_and_verl():
    log_probs = np.array([-1.0, -25.0, -1.0, -3.0], "float32")
    ref_log_probs = np.array([-1.5, -1.0, -40.0, -2.9], "float32")
    log_r = np.float64(ref_log_probs) - np.float64(log_probs)
    verl_k3 = np.clip(np.expm1(np.clip(log_r, -20, 20)) - np.clip(log_r, -20, 20), -10, 10)
    actual = to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, "k3", clip=(-10, 10)))
    np.testing.assert_allclose(actual, verl_k3, rtol=2e-6)
    openrlhf_k1 = np.clip(-log_r, -10, 10)
    actual = to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, "k1", clip=(-10, 10)))
    np.testing.assert_allclose(actual, openrlhf_k1, rtol=2e-6)


def test_plus_gradient_is_k2s_unclipped():
    log_probs = np.array([-1.0, -1.0, -50.0], "float32")
    ref_log_probs = np.array([-1.3, -0.2, -1.0], "float32")

    def fn(estimator, clip=None):
        return lambda x: kl_keras.policy_kl(x, ref_log_probs, estimator, clip=clip)

    _, (plus,) = value_and_grad(fn("k3+", (-10, 10)), log_probs)
    _, (k2,) = value_and_grad(fn("k2"), log_probs)
    np.testing.assert_array_equal(plus, k2)
    np.testing.assert_allclose(
        to_numpy(fn("k3+", (-10, 10))(log_probs)),
        np.clip(estimates64("k3", log_probs, ref_log_probs), -10, 10),
        rtol=2e-6,
    )


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+"])
def test_masked_entries_are_exact_zeros_with_zero_gradients(estimator):
    # Masked before exp: a masked log r of 500 would overflow k3 (and inf · 0 is NaN).
    log_probs = np.array([[-1.0, -500.0, np.nan, -np.inf, -2.0]], "float32")
    ref_log_probs = np.array([[-1.5, -0.1, -1.0, -1.0, np.nan]], "float32")
    mask = np.array([[1.0, 0.0, 0.0, 0.0, 0.0]], "float32")
    ratio = np.array([[1.0, np.inf, np.nan, 2.0, 1.0]], "float32")

    def fn(log_probs, ref_log_probs):
        return kl_keras.policy_kl(log_probs, ref_log_probs, estimator, mask, (-10, 10), ratio)

    values = to_numpy(fn(log_probs, ref_log_probs))
    _, gradients = value_and_grad(fn, log_probs, ref_log_probs)
    np.testing.assert_array_equal(values[0, 1:], 0.0)
    assert np.isfinite(values[0, 0]) and values[0, 0] != 0.0
    for gradient in gradients:
        assert np.all(np.isfinite(gradient))
        np.testing.assert_array_equal(gradient[0, 1:], 0.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs", "k3+"])
def test_nan_in_gives_nan_out_with_nan_gradients(estimator):
    log_probs = np.array([-1.0, np.nan, -2.0], "float32")
    ref_log_probs = np.array([-1.5, -1.0, -2.5], "float32")
    values = to_numpy(kl_keras.policy_kl(log_probs, ref_log_probs, estimator, clip=(-10, 10)))
    _, (gradient,) = value_and_grad(
        lambda x: kl_keras.policy_kl(x, ref_log_probs, estimator, clip=(-10, 10)), log_probs
    )
    assert np.isnan(values[1]) and np.all(np.isfinite(values[[0, 2]]))
    assert np.isnan(gradient[1]) and np.all(np.isfinite(gradient[[0, 2]]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_are_computed_in_float32(dtype):
    rng = np.random.default_rng(4)
    log_probs = ops.cast(np.log(rng.uniform(0.1, 1, size=(3, 5))), dtype)
    ref_log_probs = ops.cast(to_numpy(ops.cast(log_probs, "float32")) + 0.01, dtype)
    values = kl_keras.policy_kl(log_probs, ref_log_probs, "k3")
    assert keras.backend.standardize_dtype(values.dtype) == "float32"
    rounded = [to_numpy(ops.cast(x, "float32")) for x in (log_probs, ref_log_probs)]
    np.testing.assert_allclose(to_numpy(values), estimates64("k3", *rounded), rtol=2e-6)


# ---------------------------------------------------------------- the exact full KL


@pytest.mark.parametrize("gap", [1.0, 1e-3, 1e-5], ids=["far", "close", "very-close"])
def test_full_kl_is_exact_for_close_policies(gap):
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 4, 50)).astype("float32")
    ref_logits = (logits + gap * rng.normal(size=logits.shape)).astype("float32")
    actual = to_numpy(kl_keras.policy_kl_from_logits(logits, ref_logits))
    # KL(softmax(logits) ‖ softmax(ref)); long double: float64 keeps few digits at 1e-11
    expected = ref.on_logits("kl", logits, ref_logits, dtype=np.longdouble)
    np.testing.assert_allclose(actual, expected, rtol=2e-6)
    assert actual.shape == (3, 4)


def test_full_kl_masked_rows_are_never_read():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(2, 3, 5)).astype("float32")
    ref_logits = rng.normal(size=(2, 3, 5)).astype("float32")
    logits[0, 1] = np.nan
    ref_logits[1, 2] = np.inf
    mask = np.array([[1, 0, 1], [1, 1, 0]], "float32")

    def fn(logits):
        return kl_keras.policy_kl_from_logits(logits, ref_logits, mask)

    values = to_numpy(fn(logits))
    _, (gradient,) = value_and_grad(fn, logits)
    real = mask > 0
    np.testing.assert_array_equal(values[~real], 0.0)
    finite = [np.where(real[..., None], x, 0.0) for x in (logits, ref_logits)]
    np.testing.assert_allclose(values[real], ref.on_logits("kl", *finite)[real], rtol=2e-6)
    np.testing.assert_array_equal(gradient[~real], 0.0)
    assert np.all(np.isfinite(gradient))


def test_full_kl_axis():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 3)).astype("float32")
    ref_logits = rng.normal(size=(5, 3)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(kl_keras.policy_kl_from_logits(logits, ref_logits, axis=0)),
        to_numpy(kl_keras.policy_kl_from_logits(logits.T, ref_logits.T)),
        rtol=1e-6,
    )


def test_sequence_policy_kl_is_the_token_mean_of_the_full_kl():
    rng = np.random.default_rng(8)
    # On a dyadic grid, so that every float32 matmul of them is exact in any order.
    hidden = (np.round(rng.normal(size=(2, 5, 4)) * 8) / 8).astype("float32")
    kernel = (np.round(rng.normal(size=(4, 9)) * 16) / 16).astype("float32")
    ref_logits = (hidden @ kernel + 1e-3 * rng.normal(size=(2, 5, 9))).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], "float32")
    chunked = sequence_policy_kl(hidden, kernel, ref_logits, mask, chunk_size=3)
    full = kl_keras.policy_kl_from_logits(hidden @ kernel, ref_logits, mask)
    np.testing.assert_allclose(float(chunked), to_numpy(full).sum() / mask.sum(), rtol=2e-6)


# ---------------------------------------------------------------- the loss


def numpy_reduction(values, weights, reduction):
    weighted = values * weights
    if reduction == "token_mean":
        return weighted.sum() / weights.sum()
    if reduction == "sequence_sum":
        return weighted.sum(axis=1).mean()
    tokens = weights.sum(axis=1)
    return np.mean(weighted.sum(axis=1) / np.where(tokens > 0, tokens, 1))


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_sum", "sequence_mean"])
def test_loss_reductions(reduction):
    rng = np.random.default_rng(9)
    log_probs = np.log(rng.uniform(0.1, 1, size=(4, 6))).astype("float32")
    ref_log_probs = (log_probs + 0.3 * rng.normal(size=(4, 6))).astype("float32")
    weights = (rng.uniform(size=(4, 6)) > 0.3).astype("float32") * rng.uniform(0.5, 2, (4, 6))
    weights[2] = 0.0  # a sequence of padding only
    loss = kl_keras.PolicyKL("k3", reduction=reduction)
    values = estimates64("k3", log_probs, ref_log_probs)
    expected = numpy_reduction(values, np.float64(weights), reduction)
    actual = float(loss(ref_log_probs, log_probs, sample_weight=weights))
    np.testing.assert_allclose(actual, expected, rtol=2e-6)
    none = kl_keras.PolicyKL("k3", reduction="none")(ref_log_probs, log_probs, weights)
    np.testing.assert_allclose(to_numpy(none), np.where(weights > 0, values, 0), rtol=2e-6)


def test_loss_of_nothing_but_padding_is_zero_with_zero_gradients():
    log_probs = np.full((2, 3), -1.0, "float32")
    for reduction in ("token_mean", "sequence_sum", "sequence_mean"):
        loss = kl_keras.PolicyKL(reduction=reduction)
        value, (gradient,) = value_and_grad(
            lambda x, loss=loss: loss(log_probs - 0.5, x, sample_weight=np.zeros((2, 3))),
            log_probs,
        )
        assert value == 0.0
        np.testing.assert_array_equal(gradient, 0.0)


def test_loss_config_round_trip():
    loss = kl_keras.PolicyKL("low_var_kl+", clip=(-10, 10), reduction="sequence_mean")
    config = loss.get_config()
    assert set(config) == {"name", "reduction", "estimator", "clip", "dtype"}
    again = kl_keras.PolicyKL.from_config(config)
    assert again.get_config() == config
    assert keras.saving.get_registered_name(kl_keras.PolicyKL) == "kl_keras>PolicyKL"
    with pytest.raises(ValueError, match="unknown keys"):
        kl_keras.PolicyKL.from_config({**config, "beta": 0.1})


def policy_model(steps):
    """Maps (batch, steps, 3) features to the log-probability of each step's action."""
    features = keras.Input((steps, 3))
    logits = keras.layers.Dense(4)(features)
    return keras.Model(features, keras.layers.Dense(1)(logits)[..., 0])


@pytest.mark.slow
def test_fits_and_loads_in_a_fresh_process(tmp_path):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(16, 5, 3)).astype("float32")
    ref_log_probs = -np.abs(rng.normal(size=(16, 5))).astype("float32")
    mask = (rng.uniform(size=(16, 5)) > 0.2).astype("float32")
    model = policy_model(5)
    model.compile("sgd", loss=kl_keras.PolicyKL(clip=(-10, 10), reduction="sequence_mean"))
    history = model.fit(x, ref_log_probs, sample_weight=mask, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    path = tmp_path / "policy.keras"
    model.save(path)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", to_numpy(model.predict(x, verbose=0)))
    output = run_in_fresh_process(
        """
        import keras, numpy as np
        import kl_keras
        model = keras.models.load_model("policy.keras")
        assert model.loss.get_config() == kl_keras.PolicyKL(
            clip=(-10, 10), reduction="sequence_mean").get_config(), model.loss.get_config()
        difference = np.abs(model.predict(np.load("x.npy"), verbose=0) - np.load("expected.npy"))
        print("difference", difference.max())
        """,
        cwd=tmp_path,
    )
    assert float(output.split()[-1]) < 1e-6


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: kl_keras.policy_kl([0.0], [0.0], "k4"), ValueError, "estimator.*'k3\\+'"),
        (lambda: kl_keras.policy_kl([0.0], [0.0], 3), TypeError, "estimator"),
        (lambda: kl_keras.policy_kl([0.0], [0.0], "k3++"), ValueError, "estimator"),
        (lambda: kl_keras.policy_kl([0.0], [0.0], clip=(1.0, 0.0)), ValueError, "clip"),
        (lambda: kl_keras.policy_kl([0.0], [0.0], clip=(0.0,)), TypeError, "clip"),
        (lambda: kl_keras.policy_kl([0.0], [0.0], clip=(0.0, "1")), TypeError, "clip"),
        (lambda: kl_keras.policy_kl([0.0], [0.0], clip=(float("nan"), 1)), ValueError, "clip"),
        (lambda: kl_keras.policy_kl([0.0, 0.0], [0.0]), ValueError, "ref_log_probs"),
        (
            lambda: kl_keras.policy_kl([[0.0, 0.0]], [[0.0, 0.0]], mask=[1, 1, 1]),
            ValueError,
            "mask",
        ),
        (lambda: kl_keras.PolicyKL(reduction="mean"), ValueError, "reduction"),
        (lambda: kl_keras.PolicyKL(estimator="kl3"), ValueError, "estimator"),
        (
            lambda: kl_keras.policy_kl_from_logits(np.ones((2, 3)), np.ones((2, 4))),
            ValueError,
            "ref_logits",
        ),
        (
            lambda: kl_keras.policy_kl_from_logits(np.ones((2, 3)), np.ones((2, 3)), [1, 1, 1]),
            ValueError,
            "mask",
        ),
    ],
)
def test_bad_inputs_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.skipif(BACKEND == "jax", reason="JAX computes float64 in float32 unless x64")
def test_float64_stays_float64():
    log_probs = np.log(np.array([0.3, 0.5]))
    ref_log_probs = log_probs + np.array([1e-9, -2e-6])
    values = kl_keras.policy_kl(log_probs, ref_log_probs, "k3")
    log_r = ref_log_probs - log_probs  # exact in float64
    assert keras.backend.standardize_dtype(values.dtype) == "float64"
    exact = log_r**2 / 2 + log_r**3 / 6 + log_r**4 / 24  # e^x - 1 - x, to 1e-24 relative here
    np.testing.assert_allclose(to_numpy(values), exact, rtol=1e-9)
