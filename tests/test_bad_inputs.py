"""What a user gets for each bad input: a NaN, an infinity or an error, never a plausible number.

Each case here is a row of the README's "Bad inputs" table.
"""

import keras
import numpy as np
import pytest
from helpers import BACKEND, to_numpy
from scipy.special import rel_entr

from kl_keras import KLActivityRegularizer, KLDivergence, kl_divergence

NAN, INF = float("nan"), float("inf")
GOOD_P = [0.2, 0.3, 0.5]
GOOD_Q = [0.3, 0.3, 0.4]


def kl_rows(p_row, y_row, from_logits):
    """KL of a bad row next to a good row; the good row must stay finite."""
    loss = to_numpy(kl_divergence([p_row, GOOD_P], [y_row, GOOD_Q], from_logits=from_logits))
    assert np.isfinite(loss[1]), "a bad row leaked into a good one"
    return loss[0]


# (y_true row, y_pred row, from_logits, what the user gets)
NON_FINITE_CASES = {
    "NaN in y_true": ([NAN, 0.5, 0.5], GOOD_Q, False, "nan"),
    "NaN in y_true, logits": ([NAN, 0.5, 0.5], [0.0, 1.0, 2.0], True, "nan"),
    "NaN in y_pred": (GOOD_P, [NAN, 0.5, 0.5], False, "nan"),
    "NaN logit": (GOOD_P, [NAN, 1.0, 2.0], True, "nan"),
    "inf in y_true": ([INF, 0.5, 0.5], GOOD_Q, False, "inf"),
    "inf in y_pred": (GOOD_P, [INF, 0.5, 0.5], False, "-inf"),
    "+inf logit": (GOOD_P, [INF, 1.0, 2.0], True, "nan"),
    "-inf logit where y_true > 0": (GOOD_P, [-INF, 1.0, 2.0], True, "inf"),
    "negative y_true": ([-0.2, 0.7, 0.5], GOOD_Q, False, "nan"),
    "negative y_pred": (GOOD_P, [-0.1, 0.6, 0.5], False, "nan"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE_CASES))
def test_non_finite_and_negative_inputs_are_never_a_plausible_number(case):
    p_row, y_row, from_logits, outcome = NON_FINITE_CASES[case]
    value = kl_rows(p_row, y_row, from_logits)
    if outcome == "nan":
        assert np.isnan(value), value
    else:
        assert value == float(outcome), value


def test_rows_that_do_not_sum_to_one_give_the_generalised_formula():
    # sum(p * log(p / q)) is computed as written, as by Keras and scipy; it is a
    # divergence only for distributions (see the README on why there is no validate mode).
    p = np.array([[0.5, 0.5, 0.5]], "float32")
    q = np.array([[0.9, 0.9, 0.9]], "float32")
    np.testing.assert_allclose(to_numpy(kl_divergence(p, q)), np.sum(rel_entr(p, q), -1), rtol=1e-6)
    assert to_numpy(kl_divergence(p, q))[0] < 0


def test_integer_inputs_are_cast_to_floatx():
    loss = kl_divergence(np.array([[0, 1]]), np.array([[1, 3]]), from_logits=True)
    assert keras.backend.standardize_dtype(loss.dtype) == keras.config.floatx()
    np.testing.assert_allclose(to_numpy(loss), [np.log(1 + np.exp(-2.0))], rtol=1e-6)


def test_empty_batch():
    per_sample = kl_divergence(np.zeros((0, 4), "float32"), np.zeros((0, 4), "float32"))
    assert tuple(per_sample.shape) == (0,)
    total = KLDivergence(reduction="sum")(np.zeros((0, 4), "float32"), np.zeros((0, 4), "float32"))
    assert to_numpy(total).size == 0 or float(to_numpy(total)) == 0.0


def test_rank_zero_inputs_are_refused_and_rank_one_is_one_distribution():
    with pytest.raises(ValueError, match="got scalars"):
        kl_divergence(np.float32(1.0), np.float32(1.0))
    loss = kl_divergence(np.array(GOOD_P, "float32"), np.array(GOOD_Q, "float32"))
    assert tuple(loss.shape) == ()
    np.testing.assert_allclose(to_numpy(loss), np.sum(rel_entr(GOOD_P, GOOD_Q)), rtol=1e-6)


def test_mismatched_dtypes_follow_y_pred():
    loss = kl_divergence(np.array([GOOD_P], "float64"), np.array([GOOD_Q], "float32"))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    loss = kl_divergence(np.array([GOOD_P], "float16"), np.array([GOOD_Q], "float32"))
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"


def test_float64_is_kept_where_the_backend_has_it():
    p = np.array([GOOD_P], "float64")
    q = np.array([GOOD_Q], "float64")
    loss = kl_divergence(p, q)
    backend_dtype = keras.backend.standardize_dtype(keras.ops.convert_to_tensor(q).dtype)
    assert keras.backend.standardize_dtype(loss.dtype) == backend_dtype
    rtol = 1e-12 if backend_dtype == "float64" else 1e-6  # JAX without x64 gives float32
    np.testing.assert_allclose(to_numpy(loss), np.sum(rel_entr(p, q), -1), rtol=rtol)


def test_huge_class_counts():
    rng = np.random.default_rng(0)
    classes = 2**20
    p = rng.random((2, classes)).astype("float32")
    p /= p.sum(-1, keepdims=True)
    z = rng.normal(size=(2, classes)).astype("float32")
    loss = to_numpy(kl_divergence(p, z, from_logits=True))
    q = np.exp(np.float64(z) - np.log(np.exp(np.float64(z)).sum(-1, keepdims=True)))
    np.testing.assert_allclose(loss, np.sum(rel_entr(np.float64(p), q), -1), rtol=1e-4)


def test_shapes_that_do_not_broadcast():
    with pytest.raises(ValueError, match=r"y_true.shape=\(4, 3\), y_pred.shape=\(4, 5\)"):
        KLDivergence()(np.ones((4, 3)), np.ones((4, 5)))


@pytest.mark.parametrize(
    "cls, config, error, words",
    [
        (KLDivergence, {"axis": -1}, ValueError, r"missing keys \['dtype', 'from_logits'"),
        (KLDivergence, dict(KLDivergence().get_config(), axis="1"), TypeError, "axis='1'"),
        (
            KLDivergence,
            dict(KLDivergence().get_config(), from_logits="true"),
            TypeError,
            "from_logits='true'",
        ),
        (
            KLDivergence,
            dict(KLDivergence().get_config(), reduction="avg"),
            ValueError,
            "reduction=avg",
        ),
        (
            KLDivergence,
            dict(KLDivergence().get_config(), label_smoothing=0.1),
            ValueError,
            r"unknown keys \['label_smoothing'\]",
        ),
        (KLActivityRegularizer, {"rho": 0.1}, ValueError, r"missing keys \['beta'\]"),
        (KLActivityRegularizer, {"rho": "0.1", "beta": 1.0}, TypeError, "rho='0.1'"),
        (KLActivityRegularizer, {"rho": 0.1, "beta": -1.0}, ValueError, "beta=-1.0"),
        (
            KLActivityRegularizer,
            {"rho": 0.1, "beta": 1.0, "l1": 0.0},
            ValueError,
            r"unknown keys \['l1'\]",
        ),
        (KLActivityRegularizer, None, TypeError, "config=None"),
    ],
)
def test_bad_config_dicts_name_the_key(cls, config, error, words):
    with pytest.raises(error, match=words):
        cls.from_config(config)


@pytest.mark.skipif(BACKEND == "jax", reason="JAX computes float64 inputs in float32 here")
def test_float64_gradients_stay_float64():
    from helpers import value_and_grad

    _, (_, grad) = value_and_grad(
        kl_divergence, np.array([GOOD_P], "float64"), np.array([GOOD_Q], "float64")
    )
    assert grad.dtype == np.float64
