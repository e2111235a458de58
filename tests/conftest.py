"""Every test starts from Keras's default float policy and a cleared session."""

import keras
import pytest


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts from the default float policy and a cleared session."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    # Without the full garbage collection it would run after every test: that took 45% of
    # each suite's time (0.4-0.7 s a test), and Python's own collector frees the rest.
    keras.backend.clear_session(free_memory=False)
