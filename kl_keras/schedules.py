"""Schedules of a KL weight β, as functions of the training step.

They are `keras.optimizers.schedules.LearningRateSchedule` subclasses, so any
schedule Keras ships (`PiecewiseConstantDecay`, `CosineDecay`, ...) can be used
in their place, and they serialize the same way. A layer that takes `beta=`
(`kl_keras.VariationalSampling`) evaluates its schedule inside the compiled
training step from a step counter it owns, which is what makes the schedule
reach the step on JAX as on TensorFlow and PyTorch.
"""

import keras
from keras import ops

from kl_keras import _checks, _shell
from kl_keras._types import Config, Tensor

__all__ = ["CyclicalAnnealing", "LinearWarmup"]

_REGISTER = keras.saving.register_keras_serializable(package="kl_keras")


@_REGISTER
class LinearWarmup(_shell.StrictConfig, keras.optimizers.schedules.LearningRateSchedule):
    """β rising linearly from `start` to `stop` over `warmup_steps`, then constant.

    KL warm-up (Sønderby et al., "Ladder Variational Autoencoders", 2016;
    Bowman et al., 2016): a VAE first learns to reconstruct with a weak KL
    term, which keeps latent dimensions from collapsing onto the prior early.

    ```python
    beta = start + (stop - start) * min(step / warmup_steps, 1)
    ```

    The first training step is step 0 and gets `start`.

    Args:
        warmup_steps: the number of steps to reach `stop`, an int >= 1.
        start: β at step 0, a float >= 0.
        stop: β from step `warmup_steps` on, a float >= 0.

    Examples:
        >>> schedule = LinearWarmup(warmup_steps=4)
        >>> [round(float(schedule(step)), 2) for step in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """

    def __init__(self, warmup_steps: int, start: float = 0.0, stop: float = 1.0) -> None:
        self.warmup_steps = _checks.check_positive_int("warmup_steps", warmup_steps)
        self.start = _checks.check_weight("start", start)
        self.stop = _checks.check_weight("stop", stop)

    def __call__(self, step: Tensor) -> Tensor:
        step = ops.cast(step, "float32")
        progress = ops.minimum(step / self.warmup_steps, 1.0)
        return self.start + (self.stop - self.start) * progress

    def get_config(self) -> Config:
        return {"warmup_steps": self.warmup_steps, "start": self.start, "stop": self.stop}


@_REGISTER
class CyclicalAnnealing(_shell.StrictConfig, keras.optimizers.schedules.LearningRateSchedule):
    """β repeating a linear ramp from `start` to `stop` every `cycle_steps`.

    Cyclical annealing (Fu et al., "Cyclical Annealing Schedule: A Simple
    Approach to Mitigating KL Vanishing", NAACL 2019): each cycle spends its
    first `ratio` of steps rising from `start` to `stop` and the rest at
    `stop`, so the model repeatedly relearns to use its latents.

    ```python
    tau = (step % cycle_steps) / cycle_steps
    beta = start + (stop - start) * min(tau / ratio, 1)
    ```

    The first training step is step 0 and gets `start`; so does the first step
    of every cycle.

    Args:
        cycle_steps: the length of a cycle in steps, an int >= 1.
        ratio: the fraction of a cycle spent rising, a float in (0, 1].
        start: β at the start of a cycle, a float >= 0.
        stop: β at the end of the rise, a float >= 0.

    Examples:
        >>> schedule = CyclicalAnnealing(cycle_steps=4, ratio=0.5)
        >>> [round(float(schedule(step)), 2) for step in range(8)]
        [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]
    """

    def __init__(
        self, cycle_steps: int, ratio: float = 0.5, start: float = 0.0, stop: float = 1.0
    ) -> None:
        self.cycle_steps = _checks.check_positive_int("cycle_steps", cycle_steps)
        self.ratio = _checks.check_real(
            "ratio", ratio, "a float in (0, 1]", lambda v: 0.0 < v <= 1.0
        )
        self.start = _checks.check_weight("start", start)
        self.stop = _checks.check_weight("stop", stop)

    def __call__(self, step: Tensor) -> Tensor:
        # The remainder is taken before the cast, so integer steps stay exact.
        step = ops.convert_to_tensor(step)
        tau = ops.cast(ops.mod(step, self.cycle_steps), "float32") / self.cycle_steps
        progress = ops.minimum(tau / self.ratio, 1.0)
        return self.start + (self.stop - self.start) * progress

    def get_config(self) -> Config:
        return {
            "cycle_steps": self.cycle_steps,
            "ratio": self.ratio,
            "start": self.start,
            "stop": self.stop,
        }
