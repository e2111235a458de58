"""What the Keras objects of kl_keras share: inputs prepared once, configs read strictly."""

from typing import TYPE_CHECKING

import keras
from keras import ops

from kl_keras import _checks
from kl_keras import divergence as core
from kl_keras._types import Config, Tensor

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self


def kind(from_logits: bool) -> str:
    """The kind of input (see `kl_keras.divergence.KINDS`) of a loss's `from_logits`."""
    return "target" if _checks.check_bool("from_logits", from_logits) else "probabilities"


def divergence(
    name: str,
    kind: str,
    y_true: Tensor,
    y_pred: Tensor,
    axis: int,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """`kl_keras.divergence.divergence_values` of inputs as a Keras loss receives them.

    Checks `axis` and `beta`, converts both inputs, computes in the dtype of `y_pred`
    (float32 for float16 and bfloat16, `floatx` for integers), checks that the shapes
    hold distributions along `axis`, and casts the result back to the dtype of `y_pred`.
    """
    axis = _checks.check_axis(axis)
    beta = _checks.check_beta(beta)
    y_pred = ops.convert_to_tensor(y_pred)
    input_dtype = keras.backend.standardize_dtype(y_pred.dtype)
    dtype = core.computation_dtype(input_dtype)
    result_dtype = input_dtype if keras.backend.is_float_dtype(input_dtype) else dtype
    y_pred = ops.cast(y_pred, dtype)
    y_true = ops.cast(ops.convert_to_tensor(y_true), dtype)
    _checks.check_distribution_shapes(y_true.shape, y_pred.shape, axis)
    values = core.divergence_values(name, kind, y_true, y_pred, axis, beta, temperature)
    return ops.cast(values, result_dtype)


class StrictConfig:
    """`from_config` that refuses keys the constructor does not take (see `check_config`)."""

    @classmethod
    def from_config(cls, config: Config) -> "Self":
        _checks.check_config(cls, config)
        return cls(**config)
