"""The exact forms that run fastest on each backend's engine.

Everything in kl_keras is `keras.ops`; what differs between backends is only which of
two exact forms of the same function is cheaper, and every derivative mode stays the
backend's own. XLA (TensorFlow with `jit_compile`, JAX) fuses a chain of elementwise
ops into one pass; PyTorch runs op by op, each op a kernel that writes a full-size
temporary, so there the fused `log_sigmoid` kernel (one pass forward, one backward,
with forward-mode, second-order and `torch.func` rules) wins. Measured in
BENCHMARKS.md. (The log-softmax of every divergence from logits is the core's own,
`kl_keras.divergence.log_ratio`, the same on every backend.)
"""

import keras
from keras import ops

from kl_keras._types import Tensor


def op_by_op() -> bool:
    """True on PyTorch, whose eager engine runs one kernel per op (see the module docstring)."""
    return keras.backend.backend() == "torch"


def log_sigmoids(logits: Tensor) -> Tensor:
    """`(log_sigmoid(logits), log_sigmoid(-logits))`, each exact with its derivatives at 0.

    PyTorch: two fused `log_sigmoid` kernels. XLA: both from one `log1p(exp(-|z|))`,
    `log_sigmoid(z) = min(z, 0) - log1p(exp(-|z|))` and `log_sigmoid(-z) = -relu(z) -
    log1p(exp(-|z|))`, where `-|z|` and `min(z, 0)` are `where`s that take the `z <= 0`
    branch at 0, and every backend gives `relu` the derivative 0 there, so every
    derivative is that of the smooth function, at 0 as well (`sigmoid(0) = 0.5`, tested);
    `z = +inf` and `z = -inf` give 0 and -inf as they should.
    """
    if op_by_op():
        return ops.log_sigmoid(logits), ops.log_sigmoid(-logits)
    positive = logits > 0
    softplus_of_negative_abs = ops.log1p(ops.exp(ops.where(positive, -logits, logits)))
    log_on = ops.where(positive, 0.0, logits) - softplus_of_negative_abs
    return log_on, -ops.relu(logits) - softplus_of_negative_abs
