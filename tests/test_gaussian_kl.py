"""gaussian_kl_divergence: values and gradients against float64, Monte Carlo, edge cases."""

import keras
import numpy as np
import pytest
import reference as ref
from helpers import to_numpy, value_and_grad

import kl_keras

# The closed form in float64; expm1(d) - d keeps 1e-9 relative digits for |d| >= 1e-6.
reference = ref.gaussian_kl


def test_pinned_example():
    # 0.5 * ((e^0.2 - 1.2 + 0.25) + (e^-0.7 - 0.3 + 1.0)), in float64: 0.73399400...
    mean = np.array([[0.5, -1.0]], "float32")
    log_var = np.array([[0.2, -0.7]], "float32")
    value = to_numpy(kl_keras.gaussian_kl_divergence(mean, log_var))
    assert value.shape == (1,)
    np.testing.assert_allclose(value, [0.7339940], rtol=1e-6)
    np.testing.assert_allclose(value, reference(mean, log_var), rtol=1e-6)


def test_float32_matches_float64_over_the_range():
    rng = np.random.default_rng(0)
    tiny = [0.0, 1e-6, -1e-6, 1e-4, -1e-4, 1e-3, -1e-3, 0.4999, 0.5, -0.5001, 20.0, -20.0]
    log_var = np.concatenate([rng.uniform(-20, 20, 4000), tiny]).astype("float32")
    mean = rng.uniform(-10, 10, log_var.size).astype("float32")
    mean[: log_var.size // 2] = 0.0  # half with the spread term alone, the hard case
    mean[-len(tiny) :] = 0.0
    value = to_numpy(kl_keras.gaussian_kl_divergence(mean[:, None], log_var[:, None]))
    expected = reference(mean[:, None], log_var[:, None])
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=0)


def test_tiny_log_variances_are_not_lost():
    # The textbook -0.5 * (1 + lv - exp(lv)) cancels in float32 here (to exactly 0 at
    # ±1e-4, to 6e-8 instead of 2.5e-13 at 1e-6); the true value is about lv² / 4.
    log_var = np.array([[1e-4], [-1e-4], [1e-6]], "float32")
    textbook = -0.5 * (1 + log_var[:, 0] - np.exp(log_var[:, 0]))
    truth = reference(0.0, log_var)
    assert np.all(np.abs(textbook - truth) > 0.5 * truth)
    value = to_numpy(kl_keras.gaussian_kl_divergence(np.zeros_like(log_var), log_var))
    np.testing.assert_allclose(value, np.float64(log_var[:, 0]) ** 2 / 4, rtol=1e-4)
    np.testing.assert_allclose(value, truth, rtol=1e-5)


def test_learned_prior_matches_float64():
    rng = np.random.default_rng(1)
    mean, log_var, prior_mean, prior_log_var = (
        rng.normal(scale=2.0, size=(5, 7)).astype("float32") for _ in range(4)
    )
    value = kl_keras.gaussian_kl_divergence(mean, log_var, prior_mean, prior_log_var)
    np.testing.assert_allclose(
        to_numpy(value), reference(mean, log_var, prior_mean, prior_log_var), rtol=1e-5
    )
    # A scalar prior broadcasts like a full one.
    scalar = kl_keras.gaussian_kl_divergence(mean, log_var, 0.5, -1.0)
    np.testing.assert_allclose(to_numpy(scalar), reference(mean, log_var, 0.5, -1.0), rtol=1e-5)


def test_monte_carlo_estimate_agrees():
    # E_q[log q(z) - log p(z)] from 400k samples of q (fixed seed), against the closed form.
    rng = np.random.default_rng(2)
    mean, log_var = np.array([0.5, -1.0, 2.0]), np.array([0.2, -0.7, 1.5])
    prior_mean, prior_log_var = np.array([0.0, 0.3, 1.0]), np.array([0.0, 0.5, -0.4])
    z = mean + np.exp(log_var / 2) * rng.standard_normal((400_000, 3))

    def log_normal(x, m, lv):
        return -0.5 * (np.log(2 * np.pi) + lv + (x - m) ** 2 / np.exp(lv))

    estimate = np.mean(
        np.sum(log_normal(z, mean, log_var) - log_normal(z, prior_mean, prior_log_var), -1)
    )
    value = kl_keras.gaussian_kl_divergence(
        *(x.astype("float32") for x in (mean, log_var, prior_mean, prior_log_var))
    )
    np.testing.assert_allclose(to_numpy(value), estimate, rtol=1e-2)


def test_gradients_are_the_analytic_ones():
    rng = np.random.default_rng(3)
    mean, log_var, prior_mean, prior_log_var = (
        rng.normal(size=(4, 6)).astype("float32") for _ in range(4)
    )
    log_var[0, :3] = [1e-5, -3e-4, 0.0]  # the series branch, at and around 0
    _, (g_mean, g_log_var, g_prior_mean, g_prior_log_var) = value_and_grad(
        kl_keras.gaussian_kl_divergence, mean, log_var, prior_mean, prior_log_var
    )
    m, lv, pm, plv = (np.float64(x) for x in (mean, log_var, prior_mean, prior_log_var))
    np.testing.assert_allclose(g_mean, (m - pm) * np.exp(-plv), rtol=1e-5)
    np.testing.assert_allclose(g_log_var, 0.5 * np.expm1(lv - plv), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(g_prior_mean, -(m - pm) * np.exp(-plv), rtol=1e-5)
    expected = -0.5 * np.expm1(lv - plv) - 0.5 * (m - pm) ** 2 * np.exp(-plv)
    np.testing.assert_allclose(g_prior_log_var, expected, rtol=1e-5, atol=1e-9)


def test_axis():
    rng = np.random.default_rng(4)
    mean, log_var = (rng.normal(size=(3, 4, 5)).astype("float32") for _ in range(2))
    for axis in (0, 1, -1):
        value = kl_keras.gaussian_kl_divergence(mean, log_var, axis=axis)
        np.testing.assert_allclose(to_numpy(value), reference(mean, log_var, axis=axis), rtol=1e-5)
    with pytest.raises(TypeError, match="axis"):
        kl_keras.gaussian_kl_divergence(mean, log_var, axis=1.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_computed_and_returned_in_float32(dtype):
    log_var = np.array([[30.0, -30.0], [11.5, -11.5], [1e-3, 0.0]], "float32")
    mean = np.array([[3.0, -3.0], [0.5, 0.5], [0.0, 1.0]], "float32")
    value = kl_keras.gaussian_kl_divergence(
        keras.ops.cast(mean, dtype), keras.ops.cast(log_var, dtype)
    )
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    rounded = [
        to_numpy(keras.ops.cast(keras.ops.cast(x, dtype), "float32")) for x in (mean, log_var)
    ]
    np.testing.assert_allclose(to_numpy(value), reference(*rounded), rtol=1e-5)


def test_float64_is_kept_where_the_backend_has_it():
    mean, log_var = np.array([[0.5]]), np.array([[1e-9]])
    value = kl_keras.gaussian_kl_divergence(mean, log_var)
    backend_dtype = keras.backend.standardize_dtype(keras.ops.convert_to_tensor(mean).dtype)
    assert keras.backend.standardize_dtype(value.dtype) == backend_dtype
    rtol = 1e-12 if backend_dtype == "float64" else 1e-6  # JAX without x64 gives float32
    np.testing.assert_allclose(to_numpy(value), [0.125 + 1e-18 / 4], rtol=rtol)


def test_nan_gives_nan_value_and_gradients_for_that_sample_only():
    mean = np.array([[0.5, np.nan], [0.5, 1.0]], "float32")
    log_var = np.array([[0.1, 0.2], [0.1, 0.2]], "float32")
    value, (g_mean, g_log_var) = value_and_grad(
        lambda m, lv: kl_keras.gaussian_kl_divergence(m, lv)[0], mean, log_var
    )
    assert np.isnan(value) and np.all(np.isnan(g_mean[0])) and np.all(np.isnan(g_log_var[0]))
    per_sample = to_numpy(kl_keras.gaussian_kl_divergence(mean, log_var))
    np.testing.assert_allclose(per_sample[1], reference(mean[1], log_var[1]), rtol=1e-6)


def test_infinite_log_variance_gives_infinity():
    value = kl_keras.gaussian_kl_divergence(
        np.zeros((2, 1), "float32"), np.array([[np.inf], [-np.inf]], "float32")
    )
    assert np.all(np.isposinf(to_numpy(value)))
