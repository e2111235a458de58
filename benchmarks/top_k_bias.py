"""What distilling from a teacher's top-k instead of its full distribution costs: the bias of
each tail (`TopKDistillation(tail="bucket")` and `tail="renormalize"`) against the full
KL(teacher ‖ student), in value and in the direction of the gradient.

    python benchmarks/top_k_bias.py [--byte-level examples/output/sequence_logits.npz]
        [--json benchmarks/results/top_k_bias.json]

Two cases, in float64 (NumPy; the formulas are those of TopKDistillation at T = 1, KL):
- synthetic: V = 131072, 64 tokens; teacher logits a standard normal times 2.5 with the
  first 20 entries of each token raised by 4 to 12 (a few likely tokens over a long tail),
  the student the teacher plus a normal of scale 0.5 (a student part-way through training);
- byte-level: the validation logits that examples/sequence_distillation.py writes (its
  teacher and its distilled student, V = 256, padding left out), when the file exists.

For each k: the mean over tokens of the top-k value divided by the full KL (1 is unbiased),
and the cosine between the top-k gradient with respect to the student's logits and the
full one, over all tokens together. Nothing here is timed.
"""

import argparse
import json
import pathlib

import numpy as np


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def full(teacher, student):
    """KL(P ‖ Q) per token and its gradient with respect to the student's logits."""
    log_p, log_q = log_softmax(teacher), log_softmax(student)
    p, q = np.exp(log_p), np.exp(log_q)
    return np.sum(p * (log_p - log_q), -1), q - p


def top_k(teacher, student, k, tail):
    """The top-k KL per token and its gradient with respect to the student's logits."""
    log_p, log_q = log_softmax(teacher), log_softmax(student)
    ids = np.argsort(-log_p, axis=-1)[:, :k]
    p_k = np.exp(np.take_along_axis(log_p, ids, -1))
    q_all = np.exp(log_q)
    q_k = np.take_along_axis(q_all, ids, -1)
    inside = np.zeros(q_all.shape, bool)
    np.put_along_axis(inside, ids, True, -1)
    gradient = np.zeros_like(q_all)
    if tail == "renormalize":
        p_r, q_r = p_k / p_k.sum(-1, keepdims=True), q_k / q_k.sum(-1, keepdims=True)
        value = np.sum(p_r * np.log(p_r / q_r), -1)
        np.put_along_axis(gradient, ids, q_r - p_r, -1)
        return value, gradient
    p_tail = np.maximum(1 - p_k.sum(-1), 0)
    q_tail = np.sum(np.where(inside, 0, q_all), -1)
    value = np.sum(p_k * np.log(p_k / q_k), -1)
    value += np.where(p_tail > 0, p_tail * np.log(np.where(p_tail > 0, p_tail, 1) / q_tail), 0)
    gradient = q_all - p_tail[:, None] * np.where(inside, 0, q_all) / q_tail[:, None]
    np.put_along_axis(gradient, ids, q_k - p_k, -1)
    return value, gradient


def cosine(a, b):
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


def measure(name, teacher, student, ks):
    rows = []
    exact_value, exact_gradient = full(teacher, student)
    for k in ks:
        for tail in ("bucket", "renormalize"):
            value, gradient = top_k(teacher, student, k, tail)
            rows.append(
                {
                    "case": name,
                    "vocabulary": teacher.shape[-1],
                    "k": k,
                    "tail": tail,
                    "full_kl": float(exact_value.mean()),
                    "value_ratio": float(np.mean(value / exact_value)),
                    "gradient_cosine": cosine(gradient, exact_gradient),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def synthetic(seed=0, tokens=64, vocabulary=131072):
    rng = np.random.default_rng(seed)
    teacher = 2.5 * rng.normal(size=(tokens, vocabulary))
    teacher[:, :20] += rng.uniform(4, 12, size=(tokens, 20))
    student = teacher + 0.5 * rng.normal(size=teacher.shape)
    return teacher, student


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--byte-level",
        type=pathlib.Path,
        default=pathlib.Path("examples/output/sequence_logits.npz"),
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = measure("synthetic", *synthetic(), ks=(8, 64, 512))
    if args.byte_level.exists():
        with np.load(args.byte_level) as saved:
            real = saved["mask"].reshape(-1) > 0
            teacher = np.float64(saved["teacher"]).reshape(-1, saved["teacher"].shape[-1])[real]
            student = np.float64(saved["student"]).reshape(-1, saved["student"].shape[-1])[real]
        rows += measure("byte-level", teacher, student, ks=(8, 64))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
