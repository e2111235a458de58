"""The examples run end to end and print what they promise."""

import pathlib
import re
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sparse_autoencoder(tmp_path):
    output = run_example("sparse_autoencoder.py", "--epochs", "15", "--out", str(tmp_path))
    lines = dict(line.rsplit(maxsplit=1) for line in output.splitlines() if "  " in line)
    target = float(lines["target rho"])
    sparse = float(lines["mean hidden activation, with penalty"])
    free = float(lines["mean hidden activation, no penalty"])
    assert abs(sparse - target) < abs(free - target) / 5
    for name in ("sparse_autoencoder_features.png", "sparse_autoencoder_activations.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_and_load(tmp_path):
    output = run_example("save_and_load.py", "--out", str(tmp_path))
    assert "distilled_student.keras:" in output and "distilled_student.h5:" in output
    differences = re.findall(r"max \|predict difference\| (\S+),", output)
    assert len(differences) == 2 and all(float(d) < 1e-5 for d in differences)


def test_distillation(tmp_path):
    output = run_example(
        "distillation.py", "--epochs", "10", "--teacher-epochs", "3", "--out", str(tmp_path)
    )
    rows = dict(
        line.strip().rsplit(maxsplit=1) for line in output.splitlines() if line.startswith("  ")
    )
    names = {name.strip() for name in rows}
    assert "student alone" in names and "Keras LogitsDistillation() (T=3)" in names
    for divergence in ("kl", "reverse_kl", "jensen_shannon"):
        for temperature in ("1", "4"):
            assert f"kl_keras {divergence} T={temperature}" in names
    assert all(0.0 <= float(value) <= 1.0 for value in rows.values())
    png = (tmp_path / "distillation_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
