"""Argument checks shared by the public objects, run in Python, never traced."""

import inspect
import math
import numbers

import numpy as np


def _invalid(name, expected, value):
    return ValueError(
        f"Invalid value for argument `{name}`. Expected {expected}. Received: {name}={value!r}"
    )


def _wrong_type(name, expected, value):
    return TypeError(
        f"Invalid type for argument `{name}`. Expected {expected}. "
        f"Received: {name}={value!r} of type {type(value).__name__}"
    )


def check_bool(name, value):
    """Returns `value` as a Python bool; numbers and strings are refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise _wrong_type(name, "a bool", value)


def check_axis(value):
    """Returns `value` as a Python int; bools, floats and strings are refused."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise _wrong_type("axis", "an int", value)


def check_real(name, value, expected, is_valid):
    """Returns `value` as a float if it is a finite real number accepted by `is_valid`.

    `expected` describes the accepted values in the error message.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong_type(name, expected, value)
    value = float(value)
    if math.isnan(value) or not is_valid(value):
        raise _invalid(name, expected, value)
    return value


def check_config(cls, config):
    """Refuses a config for `cls` that is not a dict, or lacks or adds keys.

    `get_config()` writes every constructor argument, so a config missing one
    was not written by kl_keras and is refused rather than silently defaulted.
    """
    if not isinstance(config, dict):
        raise _wrong_type("config", f"a dict of {cls.__name__} arguments", config)
    expected = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for problem, keys in (("unknown", set(config) - expected), ("missing", expected - set(config))):
        if keys:
            raise ValueError(
                f"Invalid config for {cls.__name__}: {problem} keys {sorted(keys)}. "
                f"Expected the keys {sorted(expected)}. Received: config={config!r}"
            )


def broadcast_rank(y_true_shape, y_pred_shape):
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


def check_axis_in_rank(axis, rank):
    """Refuses an `axis` that the (broadcast) inputs of `rank` do not have."""
    if not -rank <= axis < rank:
        expected = (
            "inputs of rank >= 1 (got scalars)"
            if rank == 0
            else f"an axis of inputs of rank {rank}, in [{-rank}, {rank - 1}]"
        )
        raise _invalid("axis", expected, axis)
