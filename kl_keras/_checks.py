"""Argument checks shared by the public objects, run in Python, never traced."""

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np


def _invalid(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(
        f"Invalid value for argument `{name}`. Expected {expected}. Received: {name}={value!r}"
    )


def _wrong_type(name: str, expected: str, value: Any) -> TypeError:
    return TypeError(
        f"Invalid type for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r} of type {type(value).__name__}"
    )


def check_bool(name: str, value: Any) -> bool:
    """Returns `value` as a Python bool; numbers and strings are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _wrong_type(name, "a bool", value)


def check_axis(value: Any) -> int:
    """Returns `value` as a Python int; bools, floats and strings are refused."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise _wrong_type("axis", "an int", value)


def check_real(name: str, value: Any, expected: str, is_valid: Callable[[float], bool]) -> float:
    """Returns `value` as a float if it is a finite real number accepted by `is_valid`.

    `expected` describes the accepted values in the error message.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong_type(name, expected, value)
    value = float(value)
    if math.isnan(value) or not is_valid(value):
        raise _invalid(name, expected, value)
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Returns `value` as a Python int if it is an integer >= 1; bools are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _wrong_type(name, "an int >= 1", value)
    if value < 1:
        raise _invalid(name, "an int >= 1", value)
    return int(value)


def check_rho(value: Any) -> float:
    """The target mean activation of a sparsity penalty: a float strictly inside (0, 1)."""
    return check_real("rho", value, "a float strictly between 0 and 1", lambda v: 0.0 < v < 1.0)


def check_weight(name: str, value: Any) -> float:
    """The weight of a penalty: a finite float >= 0."""
    return check_real(name, value, "a finite float >= 0", lambda v: 0.0 <= v < float("inf"))


def check_temperature(value: Any) -> float:
    """The temperature of a distillation: a finite number > 0."""
    return check_real("temperature", value, "a finite number > 0", lambda v: 0.0 < v < float("inf"))


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Returns `value` if it is one of `choices` (strings), naming them all otherwise."""
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(choice) for choice in choices)
        raise _invalid(name, f"one of {valid}", value)
    return value


def check_beta(value: Any) -> float:
    """The mixture weight of the Jensen-Shannon divergence: a float in [0, 1]."""
    return check_real("beta", value, "a float in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def check_config(cls: Any, config: Any) -> None:
    """Refuses a config for `cls` that is not a dict or has keys `cls` does not take.

    Missing keys are allowed and take the constructor's defaults, as in Keras: a
    file saved before a release added an argument lacks that argument's key.
    Wrong values are refused by the constructor, naming the key.
    """
    if not isinstance(config, dict):
        raise _wrong_type("config", f"a dict of {cls.__name__} arguments", config)
    expected = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(config) - expected
    if unknown:
        raise ValueError(
            f"Invalid config for {cls.__name__}: unknown keys {sorted(unknown)}. "
            f"Expected some of the keys {sorted(expected)}. Received: config={config!r}"
        )


def broadcast_rank(y_true_shape: tuple[Any, ...], y_pred_shape: tuple[Any, ...]) -> int:
    """The rank of the broadcast of two static shapes; raises if they cannot broadcast.

    Unknown dimensions (`None`) are assumed to fit.
    """
    rank = max(len(y_true_shape), len(y_pred_shape))
    padded_true = (1,) * (rank - len(y_true_shape)) + tuple(y_true_shape)
    padded_pred = (1,) * (rank - len(y_pred_shape)) + tuple(y_pred_shape)
    for a, b in zip(padded_true, padded_pred, strict=True):
        if a is not None and b is not None and a != b and 1 not in (a, b):
            raise ValueError(
                "`y_true` and `y_pred` must have broadcastable shapes. Received: "
                f"y_true.shape={tuple(y_true_shape)}, y_pred.shape={tuple(y_pred_shape)}"
            )
    return rank


def check_axis_in_rank(axis: int, rank: int) -> None:
    """Refuses an `axis` that the (broadcast) inputs of `rank` do not have."""
    if not -rank <= axis < rank:
        expected = (
            "inputs of rank >= 1 (got scalars)"
            if rank == 0
            else f"an axis of inputs of rank {rank}, in [{-rank}, {rank - 1}]"
        )
        raise _invalid("axis", expected, axis)


def check_distribution_shapes(
    y_true_shape: tuple[Any, ...], y_pred_shape: tuple[Any, ...], axis: int
) -> None:
    """Refuses inputs that cannot hold distributions along `axis` against each other.

    The shapes must broadcast and have `axis`; and along `axis` itself they must
    have the same size. A size of 1 there would broadcast a single number across
    the classes: integer labels of shape `(batch, 1)` against probabilities
    `(batch, classes)` give a plausible but meaningless number.
    """
    rank = broadcast_rank(y_true_shape, y_pred_shape)
    check_axis_in_rank(axis, rank)
    padded_true = (1,) * (rank - len(y_true_shape)) + tuple(y_true_shape)
    padded_pred = (1,) * (rank - len(y_pred_shape)) + tuple(y_pred_shape)
    size_true, size_pred = padded_true[axis], padded_pred[axis]
    if size_true is not None and size_pred is not None and size_true != size_pred:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same size along axis {axis}, the axis "
            f"that holds the distributions. Received: y_true.shape={tuple(y_true_shape)}, "
            f"y_pred.shape={tuple(y_pred_shape)}. Pass one-hot or probability targets of "
            "the same shape as `y_pred`; for integer class labels use "
            "`keras.losses.SparseCategoricalCrossentropy`."
        )
