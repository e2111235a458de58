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
    keras.backend.clear_session()
