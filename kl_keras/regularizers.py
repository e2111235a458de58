"""Keras regularizers built on the Kullback-Leibler divergence."""

import keras
from keras import ops

from kl_keras import _checks, _shell
from kl_keras._types import Config, Tensor
from kl_keras.divergence import sparsity_penalty


def _keras_divides_activity_penalty_by_batch_size() -> bool:
    """Keras 3.14 started dividing every activity penalty by the batch size.

    See keras-team/keras#22018: from 3.14 on, `Layer.__call__` adds
    `activity_regularizer(output) / ops.shape(output)[0]` to the layer's losses;
    before, it added the regularizer's value unchanged.
    """
    major, minor = (int(part) for part in keras.__version__.split(".")[:2])
    return (major, minor) >= (3, 14)


KERAS_DIVIDES_BY_BATCH_SIZE = _keras_divides_activity_penalty_by_batch_size()


@keras.saving.register_keras_serializable(package="kl_keras")
class KLActivityRegularizer(_shell.StrictConfig, keras.regularizers.Regularizer):
    """Sparsity penalty of sparse autoencoders: β·Σ_j KL(ρ ‖ ρ̂_j).

    Attach it as a layer's `activity_regularizer` to push the mean activation
    `ρ̂_j` of every unit `j` toward a small target `ρ` (A. Ng, "Sparse
    autoencoder", CS294A lecture notes, 2011). Both Bernoulli terms are kept,
    so the penalty is never negative:

    ```python
    rho_hat = mean(activations, axis=all axes but the last)
    penalty = beta * sum(rho * log(rho / rho_hat)
                         + (1 - rho) * log((1 - rho) / (1 - rho_hat)))
    ```

    `ρ̂_j` is the mean over the batch and, for sequence or convolution outputs
    `(batch, ..., units)`, over the time or space positions too; a rank-1
    output `(batch,)` is one unit. `ρ̂` is clipped to `[ε, 1 - ε]`
    (`ε = keras.config.epsilon()`) with its gradient kept, so saturated
    sigmoids, ReLU outputs above 1 and all-zero batches give a finite
    penalty. float16 and bfloat16 activations are computed in float32. Under
    `tf.distribute` strategies `ρ̂_j` is the mean over the global batch (an
    all-reduce across replicas), as under JAX's `keras.distribution`: a
    per-replica mean would be a different, biased penalty. The
    activations should lie in [0, 1] (sigmoid, or ReLU that stays small):
    the penalty treats `ρ̂_j` as a firing probability.

    β means the same on every Keras 3 version and at every batch size: the
    value that reaches `layer.losses` / `model.losses` is `penalty(x)` above.
    Keras 3.14 and later divide what an activity regularizer returns by the
    batch size (keras-team/keras#22018), which would make a batch-mean
    penalty shrink as the batch grows; on those versions `reg(x)` returns
    `penalty(x) * batch_size` so that the division gives back `penalty(x)`.
    Call `reg.penalty(x)` for the penalty itself.

    Args:
        rho: target mean activation ρ, a float strictly between 0 and 1.
        beta: weight β of the penalty, a float >= 0.

    Examples:
        >>> import numpy as np
        >>> reg = KLActivityRegularizer(rho=0.05, beta=0.01)
        >>> activations = np.full((8, 4), 0.5, dtype="float32")  # 4 units, mean 0.5
        >>> round(float(reg.penalty(activations)), 4)  # 0.01 * 4 * KL(0.05 ‖ 0.5)
        0.0198
    """

    def __init__(self, rho: float = 0.05, beta: float = 0.01) -> None:
        self.rho = _checks.check_rho(rho)
        self.beta = _checks.check_weight("beta", beta)

    def penalty(self, x: Tensor) -> Tensor:
        """β·Σ_j KL(ρ ‖ ρ̂_j) for activations `x` of shape `(batch, ..., units)`.

        Returns a scalar tensor, float32 for float16/bfloat16 activations; 0 for
        an empty batch.
        """
        return self.beta * sparsity_penalty(x, self.rho)[0]

    def __call__(self, x: Tensor) -> Tensor:
        """The value Keras expects from an activity regularizer; see the class doc."""
        penalty = self.penalty(x)
        if KERAS_DIVIDES_BY_BATCH_SIZE:
            penalty = penalty * ops.cast(ops.shape(x)[0], penalty.dtype)
        return penalty

    def get_config(self) -> Config:
        return {"rho": self.rho, "beta": self.beta}
