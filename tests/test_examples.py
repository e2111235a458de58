"""The examples run end to end and print what they promise."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # end to end; the minimum-Keras CI run skips it

TAILS = ("bucket", "renormalize")
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
    # KLMonitor's keys reach the progress bar.
    assert "code_rho_hat:" in output and "val_code_dead_units:" in output
    for name in (
        "sparse_autoencoder_features.png",
        "sparse_autoencoder_activations.png",
        "sparse_autoencoder_monitor.png",
    ):
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


def test_vae(tmp_path):
    output = run_example("vae.py", "--epochs", "15", "--latent", "6", "--out", str(tmp_path))
    rows = {
        line[:26].strip(): line[26:].split()
        for line in output.splitlines()
        if line.startswith("  ") and "of 6" in line
    }
    assert set(rows) == {"constant beta=1", "cyclical beta 0->1", "beta=1, free bits 0.5"}
    for recon, kl, active, _, latent in rows.values():
        assert 0 < float(recon) < 64 * np.log(2) and float(kl) > 0
        assert 0 <= int(active) <= int(latent) == 6
    # Free bits of 0.5 nats keep every one of the 6 dimensions' KL at 0.5 or more.
    assert float(rows["beta=1, free bits 0.5"][1]) >= 6 * 0.5 * 0.9
    for name in ("vae_latent_space.png", "vae_samples.png", "vae_active_units.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sequence_distillation(tmp_path):
    output = run_example(
        "sequence_distillation.py",
        *("--epochs", "2", "--teacher-epochs", "1", "--subset", "200"),
        *("--vocabulary", "16384", "--out", str(tmp_path)),
    )
    rows = dict(
        line.strip().rsplit(maxsplit=1) for line in output.splitlines() if line.startswith("  ")
    )
    names = ["teacher", "student alone", "student distilled"]
    names += [f"student distilled from top-{k} files, {tail}" for k in (8, 64) for tail in TAILS]
    assert all(0 < float(rows[name]) < 8 for name in names)  # 8 bits: a uniform guess
    assert "top-64 files: " in output
    fused = float(rows["fused (kl_keras.SequenceDistiller)"])
    dense = float(rows["dense (keras.distillation.Distiller)"])
    # Dense holds several (2048, 16384) float32 tensors (134 MB each); fused never one.
    assert 0 < fused < dense / 3, (fused, dense)
    png = (tmp_path / "sequence_distillation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_policy_kl(tmp_path):
    output = run_example("policy_kl.py", "--steps", "200", "--out", str(tmp_path))
    rows = {
        line[:28].strip(): [float(v) for v in line[28:].split()]
        for line in output.splitlines()
        if line.startswith("  ") and line[:28].strip()
    }
    reverse, forward = rows["optimum, reverse KL"], rows["optimum, forward KL"]

    def nearer_to(run):  # by the reward, which settles first
        return "reverse" if abs(run[0] - reverse[0]) < abs(run[0] - forward[0]) else "forward"

    for run in ("k1 in the reward", "k2", "k3+", "exact KL"):
        assert nearer_to(rows[run]) == "reverse", (run, rows[run])
    assert nearer_to(rows["k3"]) == "forward", rows["k3"]  # k3 as a loss: the forward KL
    assert rows["k1"][1] > 1.3 * reverse[1]  # k1 as a loss holds nothing
    assert (tmp_path / "policy_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
