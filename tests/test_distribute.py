"""Real distribution engines give the same training run as one device.

Each engine needs its devices set up before its framework starts, so each run is a
fresh Python process: tf.distribute.MirroredStrategy over two logical CPUs, and
keras.distribution.DataParallel over two JAX host devices.
"""

import json

import numpy as np
import pytest
from helpers import BACKEND, run_in_fresh_process

pytestmark = pytest.mark.slow  # end to end; the minimum-Keras CI run skips it

# Shared by both engines: a student distilled from a teacher's soft labels, with a
# sparsity penalty on its hidden layer. `train(initial_weights)` returns per-epoch
# losses and final weights; `gap` measures what a per-replica mean would cost.
COMMON = """
import json
import numpy as np
import keras
import kl_keras

rng = np.random.default_rng(0)
x = rng.normal(size=(512, 20)).astype("float32")
teacher_logits = x @ rng.normal(size=(20, 6))
y = np.exp(teacher_logits - teacher_logits.max(-1, keepdims=True))
y = (y / y.sum(-1, keepdims=True)).astype("float32")
regularizer = kl_keras.KLActivityRegularizer(rho=0.1, beta=1.0)
SPARSITY_LAYER = False


def kl(y_true, y_pred):
    # A function metric: under tf.distribute Keras scales a Loss object by
    # 1/replicas inside Loss.__call__, also when it is used as a metric.
    return kl_keras.kld(y_true, y_pred, from_logits=True)


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((20,))
    if SPARSITY_LAYER:  # the same penalty from a KLActivityRegularization layer
        hidden = keras.layers.Dense(32, activation="sigmoid")(inputs)
        hidden = kl_keras.KLActivityRegularization(0.1, 1.0, name="hidden")(hidden)
    else:
        hidden = keras.layers.Dense(
            32, activation="sigmoid", activity_regularizer=regularizer, name="hidden"
        )(inputs)
    model = keras.Model(inputs, keras.layers.Dense(6)(hidden))
    model.compile(
        keras.optimizers.SGD(0.5),
        loss=kl_keras.KLDivergence(from_logits=True),
        metrics=[
            kl,
            kl_keras.metrics.KLDivergence(from_logits=True, name="kl_metric"),
            kl_keras.metrics.JensenShannonDivergence(from_logits=True, name="js_metric"),
        ],
    )
    return model


def train(model, initial_weights):
    model.set_weights(initial_weights)
    history = model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
    return history.history, [np.asarray(w).tolist() for w in model.get_weights()]


def gap(model):
    # Loss on one global batch of 32 with the global mean, against the mean of the
    # losses of its two halves of 16, each with its own per-replica mean.
    encoder = keras.Model(model.inputs, model.get_layer("hidden").output)
    h = np.asarray(encoder(x[:32]))
    kl = float(kl_keras.KLDivergence(from_logits=True)(y[:32], model(x[:32])))
    global_loss = kl + float(regularizer.penalty(h))
    per_replica = kl + (float(regularizer.penalty(h[:16])) + float(regularizer.penalty(h[16:]))) / 2
    return abs(per_replica - global_loss) / global_loss
"""

MIRRORED = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
{common}
one_device = build()
initial = one_device.get_weights()
one = train(one_device, initial)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    mirrored = build()
two = train(mirrored, initial)
print(json.dumps({{
    "replicas": strategy.num_replicas_in_sync,
    "one": one,
    "two": two,
    "gap": gap(one_device),
}}))
"""

DATA_PARALLEL = """
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
{common}
one_device = build()
initial = one_device.get_weights()
one = train(one_device, initial)
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
parallel = build()
two = train(parallel, initial)
print(json.dumps({{
    "replicas": len(jax.devices()),
    "one": one,
    "two": two,
    "gap": gap(one_device),
}}))
"""


def assert_same_run(report, histories):
    assert report["replicas"] == 2
    (history_one, weights_one), (history_two, weights_two) = report["one"], report["two"]
    for name in histories:
        np.testing.assert_allclose(history_two[name], history_one[name], rtol=1e-4)
    for one, two in zip(weights_one, weights_two, strict=True):
        np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-6)
    # The check is sharp enough to see a per-replica mean: that would move the loss
    # by more than the 1e-4 tolerance above (and the weights by about 3e-2).
    assert report["gap"] > 1e-4, report["gap"]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on the TF backend")
@pytest.mark.parametrize("sparsity", ["regularizer", "layer"])
def test_mirrored_strategy_matches_one_device(tmp_path, sparsity):
    common = COMMON.replace("SPARSITY_LAYER = False", f"SPARSITY_LAYER = {sparsity == 'layer'}")
    output = run_in_fresh_process(MIRRORED.format(common=common), cwd=tmp_path)
    # Not the displayed "loss": under tf.distribute Keras 3 keeps one list of layer
    # losses for all replica threads, and a layer that synchronises replicas (ours, or
    # Keras's BatchNormalization(synchronized=True) with any activity regularizer) lets
    # one replica's penalty be summed into another replica's displayed loss. Gradients
    # use only each replica's own term, so the weights and the metrics are exact.
    assert_same_run(
        json.loads(output.strip().splitlines()[-1]), histories=["kl", "kl_metric", "js_metric"]
    )


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on the JAX backend")
def test_jax_data_parallel_matches_one_device(tmp_path):
    output = run_in_fresh_process(DATA_PARALLEL.format(common=COMMON), cwd=tmp_path)
    assert_same_run(
        json.loads(output.strip().splitlines()[-1]),
        histories=["loss", "kl", "kl_metric", "js_metric"],
    )


# A VAE whose sampling layer anneals β with free bits: the KL's batch means (and their
# free-bits floors) must be over the global batch. The decoder reads the mean, so the
# noise, which each replica draws for its own slice, does not enter the weights; the
# sample is a second output without a loss, which keeps the layer in the step.
VAE = """
import json
import numpy as np
import keras
import kl_keras

x = np.random.default_rng(0).uniform(size=(256, 12)).astype("float32")


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    mean = keras.layers.Dense(4)(hidden)
    log_var = keras.layers.Dense(4)(hidden)
    z = kl_keras.VariationalSampling(
        kl_keras.schedules.LinearWarmup(5), free_bits=0.05, name="z"
    )([mean, log_var])
    decoded = keras.layers.Dense(12, activation="sigmoid", name="decoded")(mean)
    model = keras.Model(inputs, {"decoded": decoded, "z": z})
    model.compile(keras.optimizers.SGD(0.5), loss={"decoded": "binary_crossentropy"})
    return model


def train(model, initial_weights):
    model.set_weights(initial_weights)
    model.fit(x, {"decoded": x}, batch_size=32, epochs=1, shuffle=False, verbose=0)
    layer = model.get_layer("z")
    return {
        "weights": [np.asarray(w).tolist() for w in model.get_weights()],
        "step": int(keras.ops.convert_to_numpy(layer.step)),
        "beta": float(keras.ops.convert_to_numpy(layer.current_beta)),
    }


def gap(model):
    # How far per-replica floors (two halves of 16) are from the global one (32).
    encoder = keras.Model(model.inputs, model.get_layer("z").input)
    mean, log_var = (np.asarray(t, "float64") for t in encoder(x[:32]))
    kl = 0.5 * (np.expm1(log_var) - log_var + mean**2)
    def floored(rows):
        return np.maximum(kl[rows].mean(0), 0.05).sum()
    per_replica = (floored(slice(0, 16)) + floored(slice(16, 32))) / 2
    return abs(per_replica - floored(slice(0, 32))) / floored(slice(0, 32))
"""


def assert_same_vae_run(report):
    assert report["replicas"] == 2
    one, two = report["one"], report["two"]
    assert one["step"] == two["step"] == 8
    assert one["beta"] == two["beta"] == 1.0  # LinearWarmup(5) at step 7
    for a, b in zip(one["weights"], two["weights"], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert report["gap"] > 1e-3, report["gap"]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on the TF backend")
def test_vae_under_mirrored_strategy_matches_one_device(tmp_path):
    output = run_in_fresh_process(MIRRORED.format(common=VAE), cwd=tmp_path)
    assert_same_vae_run(json.loads(output.strip().splitlines()[-1]))


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on the JAX backend")
def test_vae_under_jax_data_parallel_matches_one_device(tmp_path):
    output = run_in_fresh_process(DATA_PARALLEL.format(common=VAE), cwd=tmp_path)
    assert_same_vae_run(json.loads(output.strip().splitlines()[-1]))


# SequenceDistiller, its padding uneven across replicas (a per-replica mean would differ):
# `run()` returns the loss, two epochs of training and the token count.
SEQUENCE_COMMON = """
import json
import numpy as np
import keras
import kl_keras

V, T = 32, 8
rng = np.random.default_rng(0)
x = rng.integers(0, V, size=(32, T)).astype("int32")
weights = (np.arange(T) < rng.integers(2, T + 1, size=(32, 1))).astype("float32")


def language_model(width, seed):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(V, width, embeddings_initializer="random_normal")(tokens)
    h = keras.layers.Dense(width, activation="tanh", kernel_initializer="random_normal")(
        keras.layers.Dense(width, kernel_initializer=keras.initializers.RandomNormal(0, 3))(h)
    )
    head = keras.layers.Dense(
        V, kernel_initializer=keras.initializers.RandomNormal(0, 1), name=f"head{seed}"
    )
    return keras.Model(tokens, head(h))


def run():
    teacher, student = language_model(16, 0), language_model(8, 1)
    initial = student.get_weights()
    distiller = kl_keras.SequenceDistiller(
        teacher, student, "jensen_shannon", temperature=1.5, chunk_size=24
    )
    distiller.compile(optimizer=keras.optimizers.SGD(0.5))
    before = float(keras.ops.convert_to_numpy(
        distiller.compute_loss(x, x, None, weights, training=False)
    ))
    history = distiller.fit(
        x, x, sample_weight=weights, batch_size=16, epochs=2, shuffle=False, verbose=0
    )
    return {
        "loss": before,
        "history": history.history,
        "weights": [np.asarray(w).tolist() for w in student.get_weights()],
        "moved": max(
            float(np.max(np.abs(w - w0))) for w, w0 in zip(student.get_weights(), initial)
        ),
        "kernel_sharding": str(getattr(student.get_layer("head1").kernel.value, "sharding", "")),
    }
"""

# On 8 JAX host devices: the head's vocabulary axis sharded over 4 of them (ModelParallel,
# a 2 x 4 mesh), or the batch over all 8 (DataParallel).
SEQUENCES_JAX = """
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
{common}
report = {{"devices": len(jax.devices()), "one": run()}}
mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], jax.devices())
layout_map = keras.distribution.LayoutMap(mesh)
layout_map["head.*kernel"] = (None, "model")
layout_map["head.*bias"] = ("model",)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
)
report["model_parallel"] = run()
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
report["data_parallel"] = run()
print(json.dumps(report))
"""

SEQUENCES_MIRRORED = """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
{common}
report = {{"one": run()}}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    report["mirrored"] = run()
report["devices"] = strategy.num_replicas_in_sync
print(json.dumps(report))
"""


def assert_same_sequence_runs(report, names):
    one = report["one"]
    tokens = one["history"]["tokens"]
    assert tokens[0] == tokens[1] > 0
    assert one["moved"] > 1e-2 and one["loss"] > 1e-2  # a real step, not a no-op
    for name in names:
        run = report[name]
        np.testing.assert_allclose(run["loss"], one["loss"], rtol=1e-5)
        assert run["history"]["tokens"] == tokens  # the global count
        np.testing.assert_allclose(
            run["history"]["distillation_loss"], one["history"]["distillation_loss"], rtol=1e-5
        )
        for a, b in zip(run["weights"], one["weights"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on the JAX backend")
def test_sequence_distiller_sharded_over_the_vocabulary_or_the_batch_matches_one_device(
    tmp_path,
):
    code = SEQUENCES_JAX.format(common=SEQUENCE_COMMON)
    report = json.loads(run_in_fresh_process(code, cwd=tmp_path).strip().splitlines()[-1])
    assert report["devices"] == 8
    assert "model" in report["model_parallel"]["kernel_sharding"]  # the vocabulary is split
    assert_same_sequence_runs(report, ["model_parallel", "data_parallel"])


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on TensorFlow")
def test_sequence_distiller_under_mirrored_strategy_matches_one_device(tmp_path):
    code = SEQUENCES_MIRRORED.format(common=SEQUENCE_COMMON)
    report = json.loads(run_in_fresh_process(code, cwd=tmp_path).strip().splitlines()[-1])
    assert report["devices"] == 2
    assert_same_sequence_runs(report, ["mirrored"])


# PolicyKL in compile, each reduction, the padding uneven across the two halves of the batch
# (a per-replica token count would weigh the replicas' tokens differently).
POLICY = """
import json
import numpy as np
import keras
import kl_keras

rng = np.random.default_rng(0)
x = rng.normal(size=(32, 6, 3)).astype("float32")
ref_log_probs = -np.abs(rng.normal(size=(32, 6))).astype("float32")
mask = (np.arange(6) < np.where(np.arange(32)[:, None] % 16 < 8, 2, 6)).astype("float32")


def run():
    results = {{}}
    for reduction in ("token_mean", "sequence_sum", "sequence_mean"):
        keras.utils.set_random_seed(0)
        features = keras.Input((6, 3))
        log_probs = keras.layers.Dense(1)(keras.layers.Dense(4, activation="tanh")(features))
        model = keras.Model(features, log_probs[..., 0])
        model.compile(keras.optimizers.SGD(0.5), loss=kl_keras.PolicyKL(reduction=reduction))
        model.fit(x, ref_log_probs, sample_weight=mask, batch_size=16, epochs=2, shuffle=False,
                  verbose=0)
        results[reduction] = [np.asarray(w).tolist() for w in model.get_weights()]
    return results


{setup}
print(json.dumps(report))
"""

POLICY_SETUPS = {
    "tensorflow": """
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)
report = {"one": run()}
with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
    report["engine"] = run()
""",
    "jax": """
import jax

report = {"one": run()}
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
report["engine"] = run()
report["devices"] = len(jax.devices())
""",
}


@pytest.mark.skipif(BACKEND == "torch", reason="Keras has no data-parallel engine for PyTorch")
def test_policy_kl_reductions_under_data_parallel_engines_match_one_device(tmp_path):
    code = POLICY.format(setup=POLICY_SETUPS[BACKEND])
    if BACKEND == "jax":
        code = (
            'import os\nos.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"\n'
            + code
        )
    report = json.loads(run_in_fresh_process(code, cwd=tmp_path).strip().splitlines()[-1])
    assert report.get("devices", 2) == 2
    for reduction, weights in report["one"].items():
        for a, b in zip(report["engine"][reduction], weights, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=reduction)
