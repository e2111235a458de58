"""A policy trained with REINFORCE and a KL penalty to its reference, one run per estimator.

The task is a contextual bandit: 8 contexts, 10 actions, a fixed reward table. The
reference policy π_ref is a random softmax policy, and each run starts the policy π from
it, samples 256 (context, action) pairs a step from π, and takes a step of

    loss = -mean((reward - mean reward) · log π(a)) + β · penalty

with β = 0.1 and the KL penalty in one of the ways RL trainers write it:

- "k1 in the reward": the penalty subtracted from the reward, held constant (Ziegler
  et al. 2019, the classic RLHF recipe);
- "k1", "k2", "k3", "k3+" as a loss (`kl_keras.policy_kl` of the sampled tokens);
- "exact KL": `kl_keras.policy_kl_from_logits`, the full KL(π ‖ π_ref) over the actions.

What each converges to is known in closed form. With the reverse KL, the best policy is
π* ∝ π_ref · exp(reward / β); k1 in the reward, k2, k3+ and the exact KL reach it. k1 as
a loss has an expected gradient of 0: nothing holds π near π_ref. k3 as a loss (TRL's
GRPO, verl's "low_var_kl") differentiates as the forward KL(π_ref ‖ π), whose best
policy is another one: its reward and its KL(π ‖ π_ref) settle elsewhere. The script
prints where each run ends, next to both optima, and plots the expected reward and the
true KL(π ‖ π_ref) per step.

    python examples/policy_kl.py [--steps 300] [--out examples/output]

Runs on any Keras backend (set KERAS_BACKEND); nothing is downloaded.
"""

import argparse
import pathlib

import keras
import matplotlib
import numpy as np
from keras import ops

import kl_keras

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

CONTEXTS, ACTIONS, BETA, BATCH = 8, 10, 0.1, 256
RUNS = ("k1 in the reward", "k1", "k2", "k3", "k3+", "exact KL")


def task(seed=0):
    """The reward table and the reference policy's logits, one row per context."""
    rng = np.random.default_rng(seed)
    rewards = rng.uniform(0.0, 1.0, size=(CONTEXTS, ACTIONS))
    ref_logits = 1.5 * rng.normal(size=(CONTEXTS, ACTIONS))
    return rewards.astype("float32"), ref_logits.astype("float32")


def softmax(z):
    z = np.float64(z) - np.max(z, axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)


def reverse_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def optima(rewards, ref_logits):
    """The best policies of reward - β·KL, for the reverse and the forward KL."""
    q = softmax(ref_logits)
    reverse = softmax(np.log(q) + rewards / BETA)
    # Forward KL(π_ref ‖ π): π(a) = β·q(a) / (λ - r(a)), λ > max r set so that Σπ = 1.
    forward = np.empty_like(q)
    for c in range(CONTEXTS):
        low, high = rewards[c].max(), rewards[c].max() + BETA
        for _ in range(200):  # bisection on λ
            middle = (low + high) / 2
            total = np.sum(BETA * q[c] / (middle - rewards[c]))
            low, high = (middle, high) if total > 1 else (low, middle)
        forward[c] = BETA * q[c] / (high - rewards[c])
        forward[c] /= forward[c].sum()
    return reverse, forward


class Policy(keras.Model):
    """Logits per context (a Dense layer on one-hot contexts), trained on rollouts:
    `y` packs each sample's action, its reward and the reference's logits."""

    def __init__(self, penalty, ref_logits, **kwargs):
        super().__init__(**kwargs)
        self.penalty = penalty
        self.head = keras.layers.Dense(
            ACTIONS, kernel_initializer=keras.initializers.Constant(ref_logits), use_bias=False
        )

    def call(self, contexts):
        return self.head(contexts)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y = ops.convert_to_tensor(y)
        actions = ops.cast(y[:, 0], "int32")
        rewards, ref_logits = y[:, 1], y[:, 2:]
        log_pi = ops.log_softmax(y_pred)
        log_probs = ops.take_along_axis(log_pi, actions[:, None], axis=1)[:, 0]
        ref_log_probs = ops.take_along_axis(ops.log_softmax(ref_logits), actions[:, None], axis=1)[
            :, 0
        ]
        if self.penalty == "k1 in the reward":
            k1 = kl_keras.policy_kl(log_probs, ref_log_probs, "k1")
            rewards = rewards - BETA * ops.stop_gradient(k1)
        advantages = ops.stop_gradient(rewards - ops.mean(rewards))
        loss = -ops.mean(advantages * log_probs)
        if self.penalty == "exact KL":
            loss += BETA * ops.mean(kl_keras.policy_kl_from_logits(y_pred, ref_logits))
        elif self.penalty != "k1 in the reward":
            loss += BETA * ops.mean(kl_keras.policy_kl(log_probs, ref_log_probs, self.penalty))
        return loss


def train(penalty, rewards, ref_logits, steps, seed):
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    policy = Policy(penalty, ref_logits)
    policy.compile(keras.optimizers.Adam(0.05))
    eye = np.eye(CONTEXTS, dtype="float32")
    q = softmax(ref_logits)
    history = {"reward": [], "kl": []}
    for _ in range(steps):
        pi = softmax(keras.ops.convert_to_numpy(policy(eye)))
        history["reward"].append(float(np.mean(np.sum(pi * rewards, axis=-1))))
        history["kl"].append(float(np.mean(reverse_kl(pi, q))))
        contexts = rng.integers(0, CONTEXTS, size=BATCH)
        actions = np.array([rng.choice(ACTIONS, p=pi[c]) for c in contexts])
        y = np.concatenate(
            [actions[:, None], rewards[contexts, actions][:, None], ref_logits[contexts]], axis=1
        ).astype("float32")
        policy.train_on_batch(eye[contexts], y)
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("examples/output"))
    args = parser.parse_args()

    rewards, ref_logits = task()
    q = softmax(ref_logits)
    best = dict(zip(("reverse", "forward"), optima(rewards, ref_logits), strict=True))
    histories = {run: train(run, rewards, ref_logits, args.steps, seed=1) for run in RUNS}

    last = max(1, args.steps // 10)  # the mean over the last tenth of the steps
    print(f"backend {keras.backend.backend()}: {args.steps} steps, beta {BETA}")
    print(f"  {'':<26}{'reward':>8}{'KL(pi||ref)':>13}")
    for name, pi in best.items():
        reward = np.mean(np.sum(pi * rewards, axis=-1))
        print(f"  {'optimum, ' + name + ' KL':<26}{reward:8.4f}{np.mean(reverse_kl(pi, q)):13.4f}")
    for run, history in histories.items():
        reward, kl = (np.mean(history[key][-last:]) for key in ("reward", "kl"))
        print(f"  {run:<26}{reward:8.4f}{kl:13.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for run, history in histories.items():
        style = "--" if run in ("k1", "k3") else "-"
        left.plot(history["reward"], style, label=run)
        right.plot(history["kl"], style, label=run)
    for pi, color in ((best["reverse"], "k"), (best["forward"], "gray")):
        right.axhline(np.mean(reverse_kl(pi, q)), color=color, lw=0.8, ls=":")
        left.axhline(np.mean(np.sum(pi * rewards, -1)), color=color, lw=0.8, ls=":")
    left.set(xlabel="step", ylabel="expected reward")
    right.set(xlabel="step", ylabel="KL(π ‖ π_ref)")
    right.legend(fontsize=8)
    figure.suptitle(
        "REINFORCE with a KL penalty (β = 0.1): dotted, the optima of the reverse (black) "
        "and forward (gray) KL"
    )
    figure.tight_layout()
    path = args.out / "policy_kl.png"
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
