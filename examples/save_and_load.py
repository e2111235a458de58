"""Save a model that uses kl_keras and load it back in a fresh Python process.

A student is distilled from soft labels with `KLDivergence(from_logits=True)`
and has a `KLActivityRegularizer` on its hidden layer. The model is saved as
`.keras` and as legacy `.h5`; a new Python process loads each file with only
`import kl_keras` (no `custom_objects`) and reports the loss and regularizer
configs, `predict` and `evaluate`, and one more epoch of `fit`.

    python examples/save_and_load.py [--out examples/output]
"""

import argparse
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
from sklearn.datasets import load_digits

import kl_keras

CHILD = """
import json, sys
import numpy as np
import keras
import kl_keras  # registers the kl_keras objects; nothing else is needed

path, data_path = sys.argv[1], sys.argv[2]
data = np.load(data_path)
model = keras.models.load_model(path)
hidden = model.get_layer("hidden")
report = {
    "loss": model.loss.get_config(),
    "regularizer": hidden.activity_regularizer.get_config(),
    "predict": model.predict(data["x"], verbose=0).tolist(),
    "evaluate": model.evaluate(data["x"], data["y"], verbose=0),
}
if path.endswith(".h5"):
    # Keras 3 restores a legacy .h5 optimizer that cannot step on the loaded
    # variables; continue with a fresh one and the loaded loss.
    model.compile(keras.optimizers.Adam(1e-2), loss=model.loss)
report["next_epoch_loss"] = model.fit(data["x"], data["y"], verbose=0).history["loss"][0]
print(json.dumps(report))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    teacher_logits = 5.0 * np.eye(10)[digits.target]  # a confident teacher
    y = np.exp(teacher_logits) / np.exp(teacher_logits).sum(-1, keepdims=True)

    inputs = keras.Input((64,))
    hidden = keras.layers.Dense(
        32,
        activation="sigmoid",
        activity_regularizer=kl_keras.KLActivityRegularizer(rho=0.1, beta=0.1),
        name="hidden",
    )(inputs)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    model = keras.Model(inputs, logits)
    model.compile(keras.optimizers.Adam(1e-2), loss=kl_keras.KLDivergence(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=5, verbose=0)

    data_path = args.out / "distillation_data.npz"
    np.savez(data_path, x=x, y=y.astype("float32"))
    expected_predict = np.asarray(model.predict(x, verbose=0))
    expected_evaluate = model.evaluate(x, y, verbose=0)
    print(f"in this process: evaluate={expected_evaluate:.6f}")

    for extension in ("keras", "h5"):
        path = args.out / f"distilled_student.{extension}"
        model.save(path)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(data_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(child.stdout.strip().splitlines()[-1])
        assert report["loss"] == model.loss.get_config()
        assert report["regularizer"] == model.get_layer("hidden").activity_regularizer.get_config()
        difference = np.max(np.abs(np.asarray(report["predict"]) - expected_predict))
        print(
            f"{path.name:>24}: loss {report['loss']['name']}"
            f"(from_logits={report['loss']['from_logits']}), "
            f"regularizer {report['regularizer']}, "
            f"max |predict difference| {difference:.1e}, "
            f"evaluate={report['evaluate']:.6f}, next epoch loss {report['next_epoch_loss']:.6f}"
        )


if __name__ == "__main__":
    main()
