"""Test helpers: tensors to numpy, gradients on any backend, fresh processes."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


def to_numpy(x):
    """Any backend tensor (or nested Python number) as a numpy array."""
    return np.asarray(keras.ops.convert_to_numpy(x))


def value_and_grad(fn, *args):
    """`fn(*args)` summed to a scalar, and its gradient with respect to every arg.

    Uses the backend's own autodiff, so what is tested is what training uses.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            value = tf.reduce_sum(fn(*tensors))
        grads = tape.gradient(value, tensors)
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        tensors = [jnp.asarray(a) for a in args]
        value, grads = jax.value_and_grad(
            lambda *xs: jnp.sum(fn(*xs)), argnums=tuple(range(len(args)))
        )(*tensors)
    elif BACKEND == "torch":
        import torch

        tensors = [torch.tensor(np.asarray(a), requires_grad=True) for a in args]
        value = torch.sum(fn(*tensors))
        grads = torch.autograd.grad(value, tensors, allow_unused=True)
    else:
        pytest.skip(f"no gradient helper for backend {BACKEND}")
    return to_numpy(value), [None if g is None else to_numpy(g) for g in grads]


def run_in_fresh_process(code, cwd, backend=BACKEND, timeout=600):
    """Runs `code` in a new Python process with `backend`; returns its stdout.

    The child sees nothing of this process's state, as a user loading a saved model
    in a new session would.
    """
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"child process failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result.stdout


class PerStepLoss(keras.callbacks.Callback):
    """Records the loss of every training step, from the running means in `logs`.

    Keras logs the epoch's running mean of the loss after each batch; with equal
    batch sizes the k-th batch's own loss is `(k + 1) * mean_k - k * mean_(k-1)`.
    What is recorded is what reached the compiled step, on every backend.
    """

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_epoch_begin(self, epoch, logs=None):
        self._previous = 0.0

    def on_train_batch_end(self, batch, logs=None):
        mean = float(logs["loss"])
        self.losses.append((batch + 1) * mean - batch * self._previous)
        self._previous = mean
