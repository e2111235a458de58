"""Smoke test of an installed kl_keras (run outside the source tree, against the wheel or sdist)."""

import pathlib
import tempfile

import keras
import numpy as np

import kl_keras

assert "site-packages" in kl_keras.__file__, kl_keras.__file__
assert (pathlib.Path(kl_keras.__file__).parent / "py.typed").is_file()
p = np.array([[0.7, 0.2, 0.1]], dtype="float32")
q = np.array([[0.2, 0.5, 0.3]], dtype="float32")
value = float(kl_keras.kl_divergence(p, q)[0])
assert abs(value - float(np.sum(p * np.log(p / q)))) < 1e-6, value

inputs = keras.Input((3,))
model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
model.compile("adam", loss=kl_keras.KLDivergence(from_logits=True))
model.fit(q, p, epochs=1, verbose=0)
path = pathlib.Path(tempfile.mkdtemp()) / "model.keras"
model.save(path)
assert keras.models.load_model(path).loss.get_config() == model.loss.get_config()
print(f"kl_keras {kl_keras.__version__} from {kl_keras.__file__}: ok")
