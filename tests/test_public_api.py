"""The public surface: names, registration, version, typing marker."""

import importlib.metadata
import pathlib

import keras

import kl_keras


def test_all_is_exactly_the_public_surface():
    assert kl_keras.__all__ == sorted(kl_keras.__all__)
    assert set(kl_keras.__all__) == {
        "KLActivityRegularizer",
        "KLDivergence",
        "__version__",
        "kl_divergence",
        "kld",
    }
    public = {name for name in vars(kl_keras) if not name.startswith("_")}
    # Submodules are importable but not part of __all__.
    assert public - set(kl_keras.__all__) == {"divergence", "losses", "regularizers"}


def test_registered_names_are_a_promise():
    assert keras.saving.get_registered_name(kl_keras.kl_divergence) == "kl_keras>kl_divergence"
    assert keras.saving.get_registered_name(kl_keras.KLDivergence) == "kl_keras>KLDivergence"
    assert (
        keras.saving.get_registered_name(kl_keras.KLActivityRegularizer)
        == "kl_keras>KLActivityRegularizer"
    )
    for name, obj in [
        ("kl_keras>kl_divergence", kl_keras.kl_divergence),
        ("kl_keras>KLDivergence", kl_keras.KLDivergence),
        ("kl_keras>KLActivityRegularizer", kl_keras.KLActivityRegularizer),
    ]:
        assert keras.saving.get_registered_object(name) is obj


def test_public_objects_subclass_keras_bases():
    assert issubclass(kl_keras.KLDivergence, keras.losses.Loss)
    assert issubclass(kl_keras.KLActivityRegularizer, keras.regularizers.Regularizer)
    assert kl_keras.kld is kl_keras.kl_divergence


def test_version_has_one_source():
    assert kl_keras.__version__ == importlib.metadata.version("kl_keras")


def test_package_is_typed():
    assert (pathlib.Path(kl_keras.__file__).parent / "py.typed").is_file()
