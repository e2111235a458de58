"""The mean over the global batch, where an engine splits the batch across replicas.

Only `tf.distribute` needs code here. Its strategies (MirroredStrategy,
MultiWorkerMirroredStrategy, TPUStrategy) run the model once per replica on a slice
of the batch, so `ops.mean` over the batch axis is a per-replica mean. JAX's
`keras.distribution` (DataParallel, ModelParallel) traces one program over the
global batch, where `ops.mean` already is the global mean, and Keras has no
data-parallel engine for PyTorch.

The all-reduce is the one Keras's `BatchNormalization(synchronized=True)` uses;
TensorFlow differentiates through it (the gradient of a summed all-reduce is the
summed all-reduce of the upstream gradients), so every replica's activations get
the gradient of the global penalty.
"""

import keras
from keras import ops

from kl_keras._types import Tensor


def global_sum_and_count(
    x: Tensor, axis: tuple[int, ...], weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`ops.sum(x, axis)` and the number of entries summed into each value.

    With `weights` (one per position, the shape of `x` with its last axis 1, for `axis`
    every axis but the last) the sum is weighted and the count is the sum of the weights;
    an entry of weight 0 is left out, whatever its value. Both are over the global batch,
    also inside a tf.distribute replica, where each replica holds only its slice: the sums
    and counts are all-reduced.
    """
    if weights is None:
        shape = ops.shape(x)
        count = 1
        for dimension in axis:
            count = count * shape[dimension]
        total = ops.sum(x, axis=axis)
        count = ops.cast(count, x.dtype)
    else:
        total = ops.sum(ops.where(weights > 0, x, 0.0) * weights, axis=axis)
        count = ops.sum(weights)
    total, count = global_sums(total, count)
    return total, count


def global_sums(*sums: Tensor) -> tuple[Tensor, ...]:
    """Each of `sums`, a sum over this replica's slice of the batch, summed over replicas."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replica_context = tf.distribute.get_replica_context()
        if replica_context is not None and replica_context.num_replicas_in_sync > 1:
            return tuple(replica_context.all_reduce(tf.distribute.ReduceOp.SUM, s) for s in sums)
    return sums


def per_replica(loss: Tensor) -> Tensor:
    """A global loss as one replica's share: divided by the number of replicas inside a
    `tf.distribute` replica, whose gradients the optimizer sums (Keras's losses are scaled
    the same way); unchanged elsewhere, where the loss is already that of the whole batch."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replica_context = tf.distribute.get_replica_context()
        if replica_context is not None and replica_context.num_replicas_in_sync > 1:
            return loss / replica_context.num_replicas_in_sync
    return loss
