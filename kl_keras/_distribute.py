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


def global_mean(x, axis):
    """`ops.mean(x, axis)` over the global batch, also inside a tf.distribute replica."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        replica_context = tf.distribute.get_replica_context()
        if replica_context is not None and replica_context.num_replicas_in_sync > 1:
            local_sum = tf.reduce_sum(x, axis=axis)
            local_count = tf.cast(tf.size(x) // tf.size(local_sum), x.dtype)
            total = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_sum)
            count = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, local_count)
            return total / count
    return ops.mean(x, axis=axis)
