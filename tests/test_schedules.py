"""The β schedules: formulas, serialization, argument checks."""

import inspect

import keras
import numpy as np
import pytest
from helpers import to_numpy

from kl_keras import schedules

STEPS = np.arange(0, 50)


def linear_warmup(step, warmup_steps, start=0.0, stop=1.0):
    return start + (stop - start) * np.minimum(step / warmup_steps, 1.0)


def cyclical(step, cycle_steps, ratio=0.5, start=0.0, stop=1.0):
    tau = (step % cycle_steps) / cycle_steps
    return start + (stop - start) * np.minimum(tau / ratio, 1.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup_steps": 7}, {"warmup_steps": 1}, {"warmup_steps": 10, "start": 2.0, "stop": 0.5}],
)
def test_linear_warmup(kwargs):
    schedule = schedules.LinearWarmup(**kwargs)
    values = [float(to_numpy(schedule(step))) for step in STEPS]
    np.testing.assert_allclose(values, linear_warmup(STEPS, **kwargs), rtol=1e-6)
    assert float(to_numpy(schedule(0))) == kwargs.get("start", 0.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cycle_steps": 8},
        {"cycle_steps": 5, "ratio": 1.0},
        {"cycle_steps": 12, "ratio": 0.25, "start": 0.1, "stop": 3.0},
    ],
)
def test_cyclical_annealing(kwargs):
    schedule = schedules.CyclicalAnnealing(**kwargs)
    values = [float(to_numpy(schedule(step))) for step in STEPS]
    np.testing.assert_allclose(values, cyclical(STEPS, **kwargs), rtol=1e-6)


@pytest.mark.parametrize("dtype, step", [("int", 2**24 + 3), ("int32", 19), ("float32", 19)])
def test_tensor_and_variable_steps(dtype, step):
    # Keras passes a variable (the optimizer's iterations, a layer's step). Integer
    # steps stay exact past float32's integers: the remainder is taken before a cast.
    variable = keras.Variable(step, dtype=dtype, trainable=False)
    cyc = schedules.CyclicalAnnealing(cycle_steps=8, ratio=0.5)
    np.testing.assert_allclose(to_numpy(cyc(variable)), cyclical(step, 8), rtol=1e-6)
    np.testing.assert_allclose(
        to_numpy(cyc(keras.ops.convert_to_tensor(variable))), cyclical(step, 8)
    )
    warm = schedules.LinearWarmup(warmup_steps=40)
    np.testing.assert_allclose(to_numpy(warm(variable)), linear_warmup(step, 40), rtol=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.LinearWarmup(100, start=0.5, stop=2.0),
        schedules.CyclicalAnnealing(40, ratio=0.75, start=0.0, stop=0.3),
    ],
    ids=["LinearWarmup", "CyclicalAnnealing"],
)
def test_serialization_round_trips(schedule):
    config = keras.saving.serialize_keras_object(schedule)
    assert config["registered_name"] == f"kl_keras>{type(schedule).__name__}"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    # Every constructor argument is in the config.
    arguments = set(inspect.signature(type(schedule).__init__).parameters) - {"self"}
    assert set(schedule.get_config()) == arguments
    assert isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: schedules.LinearWarmup(0), ValueError, "warmup_steps=0"),
        (lambda: schedules.LinearWarmup(2.5), TypeError, "warmup_steps=2.5"),
        (lambda: schedules.LinearWarmup(True), TypeError, "warmup_steps=True"),
        (lambda: schedules.LinearWarmup(5, start=-1.0), ValueError, "start=-1.0"),
        (lambda: schedules.LinearWarmup(5, stop=float("nan")), ValueError, "stop=nan"),
        (lambda: schedules.CyclicalAnnealing(-3), ValueError, "cycle_steps=-3"),
        (lambda: schedules.CyclicalAnnealing(4, ratio=0.0), ValueError, "ratio=0.0"),
        (lambda: schedules.CyclicalAnnealing(4, ratio=1.5), ValueError, "ratio=1.5"),
        (lambda: schedules.CyclicalAnnealing(4, stop=float("inf")), ValueError, "stop=inf"),
        (lambda: schedules.CyclicalAnnealing(4, start="0"), TypeError, "start='0'"),
    ],
)
def test_invalid_arguments_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="unknown keys"):
        schedules.LinearWarmup.from_config({"warmup_steps": 3, "steps": 4})
