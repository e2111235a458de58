"""Several processes give the training run of one: TensorFlow's MultiWorkerMirroredStrategy
with two workers, and JAX with two processes joined by `keras.distribution.initialize`.

Every object of kl_keras that reduces over the batch runs in one program (`PROGRAM`): the
sparsity penalty as a regularizer and as a layer with `KLMonitor`'s statistics,
`LogitsDistillation` with per-token weights, `VariationalSampling` with free bits and a β
schedule, `SequenceDistiller`'s token count, `PolicyKL`'s token mean. The program runs once
in a single process on the whole batches, then in two processes on 127.0.0.1, each fed its
shard of every batch, and what each reports (weights, logged values, statistics, layer
state) must be the single process's. The processes are started with bounded timeouts and
killed, with their children, whatever happens.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import BACKEND

pytestmark = pytest.mark.slow  # end to end; the minimum-Keras CI run skips it

TIMEOUT = 300  # seconds for one process to finish

# The setup of each engine defines `scope()` (a context to build models in) and
# `feed(x, y, sample_weight)`: the arguments of `fit` that give this process its part of
# every global batch of 32 rows, in order.
PROGRAM = """
import json
import numpy as np

{setup}

import keras
import kl_keras


def weights_of(model):
    return [to_numpy(w).astype("float64").tolist() for w in model.weights]


def fit(model, x, y=None, sample_weight=None, **kwargs):
    return model.fit(**feed(x, y, sample_weight), shuffle=False, verbose=0, **kwargs).history


rng = np.random.default_rng(0)
report = {{}}

# Sparsity (a regularizer and a layer, with the monitor), distillation with token weights.
x = rng.normal(size=(128, 4, 6)).astype("float32")
teacher = (x @ rng.normal(size=(6, 5))).astype("float32")
tokens = (np.arange(4) < np.where(np.arange(128)[:, None] % 32 < 16, 1, 4)).astype("float32")
keras.utils.set_random_seed(0)
with scope():
    inputs = keras.Input((4, 6))
    hidden = keras.layers.Dense(
        8, activation="sigmoid", activity_regularizer=kl_keras.KLActivityRegularizer(0.1, 1.0)
    )(inputs)
    code = kl_keras.KLActivityRegularization(0.2, 1.0, name="code")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(5)(code))
    model.compile(
        keras.optimizers.SGD(0.5),
        loss=kl_keras.LogitsDistillation(2.0),
        weighted_metrics=[kl_keras.metrics.KLDivergence(from_logits=True, name="kl")],
    )
history = fit(model, x, teacher, tokens, epochs=2, callbacks=[kl_keras.callbacks.KLMonitor()])
report["sparsity"] = {{"weights": weights_of(model), "history": history}}

# A VAE: the batch-mean KL and its free-bits floor; the decoder reads the mean.
x = rng.uniform(size=(128, 12)).astype("float32")
keras.utils.set_random_seed(0)
with scope():
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    mean, log_var = keras.layers.Dense(4)(hidden), keras.layers.Dense(4)(hidden)
    z = kl_keras.VariationalSampling(
        kl_keras.schedules.LinearWarmup(5), free_bits=0.05, name="z"
    )([mean, log_var])
    decoded = keras.layers.Dense(12, activation="sigmoid", name="decoded")(mean)
    model = keras.Model(inputs, {{"decoded": decoded, "z": z}})
    model.compile(keras.optimizers.SGD(0.5), loss={{"decoded": "binary_crossentropy"}})
history = fit(model, x, {{"decoded": x}}, epochs=1, callbacks=[kl_keras.callbacks.KLMonitor()])
layer = model.get_layer("z")
report["vae"] = {{
    "weights": weights_of(model),
    "history": {{k: v for k, v in history.items() if k.startswith("z_")}},
    "step": int(keras.ops.convert_to_numpy(layer.step)),
}}

# SequenceDistiller: padding uneven across the processes' shards; the token count.
V, T = 24, 8
x = rng.integers(0, V, size=(64, T)).astype("int32")
padding = (np.arange(T) < np.where(np.arange(64)[:, None] % 32 < 16, 2, T)).astype("float32")


def language_model(width, seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(V, width, embeddings_initializer="random_normal")(tokens)
    h = keras.layers.Dense(width, activation="tanh")(h)
    return keras.Model(tokens, keras.layers.Dense(V, name=f"head{{seed}}")(h))


with scope():
    distiller = kl_keras.SequenceDistiller(
        language_model(16, 0), language_model(8, 1), "jensen_shannon", chunk_size=24
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.5))
history = fit(distiller, x, x, padding, epochs=2)
head = distiller.student.get_layer("head1").kernel.value
shards = getattr(head, "addressable_shards", None)  # JAX's
report["sequence"] = {{
    "head_columns_per_device": shards[0].data.shape[-1] if shards else head.shape[-1],
    "weights": weights_of(distiller.student),
    "history": {{k: history[k] for k in ("distillation_loss", "tokens")}},
}}

# PolicyKL, the mean over the real tokens of the global batch.
x = rng.normal(size=(64, 6, 3)).astype("float32")
ref_log_probs = -np.abs(rng.normal(size=(64, 6))).astype("float32")
mask = (np.arange(6) < np.where(np.arange(64)[:, None] % 32 < 16, 2, 6)).astype("float32")
keras.utils.set_random_seed(0)
with scope():
    features = keras.Input((6, 3))
    log_probs = keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(features))
    model = keras.Model(features, log_probs[..., 0])
    model.compile(keras.optimizers.SGD(0.5), loss=kl_keras.PolicyKL(reduction="token_mean"))
fit(model, x, ref_log_probs, mask, epochs=2)
report["policy"] = {{"weights": weights_of(model)}}

print("REPORT", json.dumps(report))
"""

SINGLE = """
import contextlib

scope = contextlib.nullcontext
to_numpy = np.asarray


def feed(x, y, sample_weight):
    return dict(x=x, y=y, sample_weight=sample_weight, batch_size=32)
"""

# Two workers of MultiWorkerMirroredStrategy (TF_CONFIG set by the test), one CPU each.
# Each worker reads the whole dataset of global batches and keeps its half of each
# (auto-sharding by data: the dataset's way; Keras refuses arrays under this strategy).
TF_WORKER = """
import tensorflow as tf

strategy = tf.distribute.MultiWorkerMirroredStrategy()
assert strategy.num_replicas_in_sync == 2
scope = strategy.scope
to_numpy = np.asarray

# Keras 3's fit does not run under this strategy (keras-team/keras#20585): it averages the
# first batch over the workers (only to build the model) with one `strategy.reduce` of the
# whole (x, y, sample_weight) structure, which this strategy takes one tensor at a time
# only, and each step's logged values over axis 0, which scalars lack. The scaling-out
# guide's workaround: build from this worker's batch; average the logs one at a time.
from keras.src.backend.tensorflow import trainer as tensorflow_trainer


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self.distribute_strategy
    for _, _, batches in iterator or ():
        local = lambda v: strategy.experimental_local_results(v)[0]
        data_batch = tf.nest.map_structure(local, next(batches))
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def reduce_per_replica(values, strategy, reduction):
    return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)


tensorflow_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
tensorflow_trainer.reduce_per_replica = reduce_per_replica


def feed(x, y, sample_weight):
    data = (x, y) if sample_weight is None else (x, y, sample_weight)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dict(x=tf.data.Dataset.from_tensor_slices(data).batch(32).with_options(options))
"""

# Two JAX processes of two CPU devices each, and one distribution over the four:
# - DataParallel: each process feeds its half of every batch of 32 (Keras assembles the
#   global batch from the processes' parts, never re-sharding it);
# - ModelParallel: a 2 x 2 mesh whose "model" axis spans the processes (each process holds
#   one of the two vocabulary shards of the distiller's heads) and whose "batch" axis lies
#   within each process, which therefore feeds whole batches.
JAX_PROCESS = """
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import contextlib
import jax
import keras
from jax.experimental import multihost_utils

keras.distribution.initialize("127.0.0.1:{port}", num_processes=2, process_id={index})
assert jax.device_count() == 4 and jax.local_device_count() == 2
scope = contextlib.nullcontext
to_numpy = lambda w: np.asarray(multihost_utils.process_allgather(w.value, tiled=True))

if "{distribution}" == "data":
    distribution = keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False
    )
    rows = lambda a: a.reshape(-1, 2, 16, *a.shape[1:])[:, {index}].reshape(-1, *a.shape[1:])
    batch_size = 16
else:
    # Row i of the mesh is batch shard i; column j, on process j, vocabulary shard j.
    devices = np.array(jax.devices()).reshape(2, 2).T
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["head.*kernel"] = (None, "model")
    layout_map["head.*bias"] = ("model",)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
    )
    rows = lambda a: a
    batch_size = 32
keras.distribution.set_distribution(distribution)


def feed(x, y, sample_weight):
    mine = lambda a: None if a is None else keras.tree.map_structure(rows, a)
    return dict(x=mine(x), y=mine(y), sample_weight=mine(sample_weight), batch_size=batch_size)
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def run_processes(programs, environments, cwd):
    """Starts one process per program, each in its own process group; returns their
    reports. Every process still alive at the end (a timeout, a failure) is killed."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(program)],
            cwd=cwd,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environment},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for program, environment in zip(programs, environments, strict=True)
    ]
    try:
        outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    reports = []
    for p, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, f"process failed ({p.returncode}):\n{stdout}\n{stderr[-3000:]}"
        line = next(line for line in stdout.splitlines() if line.startswith("REPORT "))
        reports.append(json.loads(line[len("REPORT ") :]))
    return reports


def assert_same_runs(one, many):
    for report in many:
        for name, expected in one.items():
            actual = report[name]
            for a, b in zip(actual["weights"], expected["weights"], strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
            for key, values in expected.get("history", {}).items():
                if key == "loss":
                    continue  # displayed losses: see the scaling-out guide
                np.testing.assert_allclose(
                    actual["history"][key], values, rtol=1e-5, atol=1e-7, err_msg=f"{name} {key}"
                )
            assert actual.get("step") == expected.get("step")


def single_process(cwd, backend):
    program = PROGRAM.format(setup=SINGLE)
    return run_processes([program], [{"KERAS_BACKEND": backend}], cwd)[0]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
def test_two_tensorflow_workers_train_as_one_process(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    environments = [
        {
            "KERAS_BACKEND": "tensorflow",
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        }
        for i in range(2)
    ]
    program = PROGRAM.format(setup=TF_WORKER)
    workers = run_processes([program, program], environments, tmp_path)
    assert_same_runs(single_process(tmp_path, "tensorflow"), workers)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
@pytest.mark.parametrize("distribution", ["data", "model"])
def test_two_jax_processes_train_as_one_process(tmp_path, distribution):
    (port,) = free_ports(1)
    programs = [
        PROGRAM.format(setup=JAX_PROCESS.format(port=port, index=i, distribution=distribution))
        for i in range(2)
    ]
    processes = run_processes(programs, [{"KERAS_BACKEND": "jax"}] * 2, tmp_path)
    assert_same_runs(single_process(tmp_path, "jax"), processes)
    columns = [p["sequence"]["head_columns_per_device"] for p in processes]
    assert columns == [12 if distribution == "model" else 24] * 2  # of V = 24
