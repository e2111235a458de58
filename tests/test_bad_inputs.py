"""What a user gets for each bad input: a NaN, an infinity or an error, never a plausible number.

Each case here is a row of the README's "Bad inputs" table.
"""

import keras
import numpy as np
import pytest
from helpers import BACKEND, to_numpy, value_and_grad
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


# (y_true row, y_pred row, from_logits): distributions whose value is NaN.
INVALID_ROWS = {
    "negative y_true": ([-1.0, 2.0, 0.5], GOOD_Q, False),
    "negative y_true, logits": ([-1.0, 2.0, 0.5], [0.0, 1.0, 2.0], True),
    "NaN in y_true": ([NAN, 0.5, 0.5], GOOD_Q, False),
    "NaN in y_true, logits": ([NAN, 0.5, 0.5], [0.0, 1.0, 2.0], True),
    "negative y_pred": (GOOD_P, [-0.1, 0.6, 0.5], False),
    "negative y_pred, a zero target": ([0.0, 0.5, 0.5], [0.3, -0.1, 0.8], False),
    "NaN in y_pred": (GOOD_P, [NAN, 0.5, 0.5], False),
    "NaN in y_true, a zero target, logits": ([0.0, NAN, 1.0], [0.0, 1.0, 2.0], True),
    "NaN logit": (GOOD_P, [NAN, 1.0, 2.0], True),
}


@pytest.mark.parametrize("case", sorted(INVALID_ROWS))
def test_a_nan_value_has_nan_gradients_and_other_rows_are_untouched(case):
    p_row, y_row, from_logits = INVALID_ROWS[case]
    good_y = [0.0, 1.0, 2.0] if from_logits else GOOD_Q

    def loss(p, y):
        return kl_divergence(p, y, from_logits=from_logits)

    p = np.array([p_row, GOOD_P], "float32")
    y = np.array([y_row, good_y], "float32")
    value = to_numpy(loss(p, y))
    _, (grad_p, grad_y) = value_and_grad(loss, p, y)
    assert np.isnan(value[0])
    # Every entry of the invalid distribution, in both arguments: no plausible step.
    # The one exception: probabilities where y_true == 0, on which the value does not
    # depend (0 * log 0 = 0), keep their gradient of 0.
    assert np.all(np.isnan(grad_p[0])), grad_p
    depends = np.ones(3, bool) if from_logits else np.array(p_row) != 0
    assert np.all(np.isnan(grad_y[0][depends])), grad_y
    assert np.all(grad_y[0][~depends] == 0), grad_y
    # The valid row is exactly what it is alone.
    good_value, (good_grad_p, good_grad_y) = value_and_grad(loss, p[1:], y[1:])
    np.testing.assert_allclose(value[1], good_value, rtol=1e-6)
    np.testing.assert_allclose(grad_p[1:], good_grad_p, rtol=1e-6)
    np.testing.assert_allclose(grad_y[1:], good_grad_y, rtol=1e-6)


@pytest.mark.parametrize("from_logits", [False, True])
@pytest.mark.parametrize(
    "true_shape, pred_shape", [((4, 1), (4, 10)), ((4, 10), (4, 1)), ((4, 3, 1), (4, 3, 10))]
)
def test_a_size_one_class_axis_is_refused(true_shape, pred_shape, from_logits):
    # Integer labels (batch, 1) against probabilities would broadcast along the classes
    # and give a plausible number (83.13 on 0.1.0; Keras's own loss gives 23.03).
    y_true = np.ones(true_shape, "float32")
    y_pred = np.full(pred_shape, 0.1, "float32")
    with pytest.raises(ValueError, match="SparseCategoricalCrossentropy") as error:
        kl_divergence(y_true, y_pred, from_logits=from_logits)
    assert f"y_true.shape={true_shape}, y_pred.shape={pred_shape}" in str(error.value)
    with pytest.raises(ValueError, match="same size along axis -1"):
        KLDivergence(from_logits=from_logits)(y_true, y_pred)


def test_a_size_one_axis_other_than_the_classes_still_broadcasts():
    p = np.array([[[0.2, 0.8]], [[0.5, 0.5]]], "float32")  # (2, 1, 2)
    q = np.array([[[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]]], "float32")  # (1, 3, 2)
    np.testing.assert_allclose(to_numpy(kl_divergence(p, q)), np.sum(rel_entr(p, q), -1), rtol=1e-6)
    # The size-1 rule follows `axis`: here the distributions lie along axis 1.
    with pytest.raises(ValueError, match="same size along axis 1"):
        kl_divergence(p, q, axis=1)


def test_rows_that_do_not_sum_to_one_give_the_plain_formula():
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
    _, (_, grad) = value_and_grad(
        kl_divergence, np.array([GOOD_P], "float64"), np.array([GOOD_Q], "float64")
    )
    assert grad.dtype == np.float64
