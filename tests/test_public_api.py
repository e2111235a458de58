"""The public surface: names, registration, version, typing marker."""

import importlib.metadata
import inspect
import pathlib
import re

import keras

import kl_keras

ROOT = pathlib.Path(__file__).resolve().parent.parent

LOSSES = [
    "BinaryKLDivergence",
    "JeffreysDivergence",
    "JensenShannonDivergence",
    "KLDivergence",
    "ReverseKLDivergence",
]
FUNCTIONS = [
    "binary_kl_divergence",
    "jeffreys_divergence",
    "jensen_shannon_divergence",
    "kl_divergence",
    "reverse_kl_divergence",
]


def test_all_is_exactly_the_public_surface():
    assert kl_keras.__all__ == sorted(kl_keras.__all__)
    assert set(kl_keras.__all__) == {
        *LOSSES,
        *FUNCTIONS,
        "KLActivityRegularization",
        "KLActivityRegularizer",
        "LogitsDistillation",
        "PolicyKL",
        "SequenceDistiller",
        "TopKDistillation",
        "VariationalSampling",
        "__version__",
        "callbacks",
        "gaussian_kl_divergence",
        "kld",
        "metrics",
        "policy",
        "policy_kl",
        "policy_kl_from_logits",
        "schedules",
    }
    public = {name for name in vars(kl_keras) if not name.startswith("_")}
    # Submodules are importable but not part of __all__ (metrics is: it holds the twins).
    assert public - set(kl_keras.__all__) == {
        "distillation",
        "divergence",
        "layers",
        "losses",
        "regularizers",
    }
    assert kl_keras.metrics.__all__ == LOSSES
    assert all(hasattr(kl_keras.metrics, name) for name in LOSSES)
    assert kl_keras.callbacks.__all__ == ["AdaptiveKLController", "KLMonitor"]
    assert kl_keras.schedules.__all__ == ["CyclicalAnnealing", "LinearWarmup"]


def test_registered_names_are_a_promise():
    # Every name registered by a release; never removed or renamed without an alias.
    promised = {
        **{f"kl_keras>{name}": getattr(kl_keras, name) for name in LOSSES + FUNCTIONS},
        **{f"kl_keras.metrics>{name}": getattr(kl_keras.metrics, name) for name in LOSSES},
        "kl_keras>KLActivityRegularizer": kl_keras.KLActivityRegularizer,
        "kl_keras>LogitsDistillation": kl_keras.LogitsDistillation,
        "kl_keras>PolicyKL": kl_keras.PolicyKL,
        "kl_keras>SequenceDistiller": kl_keras.SequenceDistiller,
        "kl_keras>TopKDistillation": kl_keras.TopKDistillation,
        "kl_keras>VariationalSampling": kl_keras.VariationalSampling,
        "kl_keras>KLActivityRegularization": kl_keras.KLActivityRegularization,
        "kl_keras>LinearWarmup": kl_keras.schedules.LinearWarmup,
        "kl_keras>CyclicalAnnealing": kl_keras.schedules.CyclicalAnnealing,
    }
    for name, obj in promised.items():
        assert keras.saving.get_registered_object(name) is obj, name
        assert keras.saving.get_registered_name(obj) == name
    # And nothing else is registered: a new name joins the promise above, in this test.
    registered = {
        name
        for name in keras.saving.get_custom_objects()
        if name.split(">")[0] in ("kl_keras", "kl_keras.metrics")
    }
    assert registered == set(promised)


def test_public_objects_subclass_keras_bases():
    for name in LOSSES:
        assert issubclass(getattr(kl_keras, name), keras.losses.Loss)
        assert issubclass(getattr(kl_keras.metrics, name), keras.metrics.Metric)
    assert issubclass(kl_keras.KLActivityRegularizer, keras.regularizers.Regularizer)
    assert issubclass(kl_keras.LogitsDistillation, keras.losses.Loss)
    assert issubclass(kl_keras.LogitsDistillation, keras.distillation.DistillationLoss)
    assert issubclass(kl_keras.VariationalSampling, keras.layers.Layer)
    assert issubclass(kl_keras.KLActivityRegularization, keras.layers.Layer)
    assert issubclass(kl_keras.callbacks.KLMonitor, keras.callbacks.Callback)
    assert issubclass(kl_keras.callbacks.AdaptiveKLController, keras.callbacks.Callback)
    assert issubclass(kl_keras.PolicyKL, keras.losses.Loss)
    assert issubclass(kl_keras.TopKDistillation, keras.losses.Loss)
    assert issubclass(kl_keras.distillation.TopKDataset, keras.utils.PyDataset)
    for schedule in (kl_keras.schedules.LinearWarmup, kl_keras.schedules.CyclicalAnnealing):
        assert issubclass(schedule, keras.optimizers.schedules.LearningRateSchedule)
    assert kl_keras.kld is kl_keras.kl_divergence


def test_version_has_one_source():
    assert kl_keras.__version__ == importlib.metadata.version("kl_keras")


def test_package_is_typed():
    assert (pathlib.Path(kl_keras.__file__).parent / "py.typed").is_file()


def _public_objects():
    """(qualified name, object) of everything in the public surface, and their public methods."""
    modules = {"kl_keras": kl_keras, "kl_keras.metrics": kl_keras.metrics}
    modules.update({"kl_keras.callbacks": kl_keras.callbacks})
    modules.update({"kl_keras.schedules": kl_keras.schedules})
    for prefix, module in modules.items():
        for name in module.__all__:
            obj = getattr(module, name)
            if name.startswith("__") or inspect.ismodule(obj):
                continue
            yield f"{prefix}.{name}", obj
            if inspect.isclass(obj):
                for method, value in vars(obj).items():
                    # Overrides of Keras's methods (call, get_config, ...) are Keras's API.
                    inherited = any(hasattr(base, method) for base in obj.__mro__[1:])
                    if not method.startswith("_") and callable(value) and not inherited:
                        yield f"{prefix}.{name}.{method}", value


def test_every_public_object_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not (obj.__doc__ or "").strip()]
    assert missing == []


def test_the_api_reference_covers_the_public_surface():
    # docs/reference/*.md name each object (`::: module` with `members:`, or a whole module).
    text = "\n".join(p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md"))
    for name, obj in _public_objects():
        if name.count(".") > 2 or (name.startswith("kl_keras.") and name.count(".") == 2):
            continue  # methods are documented with their class; submodule members below
        if obj is kl_keras.kld and name.endswith(".kld"):
            continue  # the alias of kl_divergence, named on the losses page
        short = name.rsplit(".", 1)[1]
        assert re.search(rf"(- {short}$|\.{short}$)", text, re.MULTILINE), name
    for module in ("metrics", "callbacks", "schedules"):
        assert f"::: kl_keras.{module}\n" in text, module
