"""kl_keras: Kullback-Leibler divergence and its family for Keras 3, exact and serializable."""

from kl_keras import callbacks, metrics, policy, schedules
from kl_keras.distillation import LogitsDistillation, SequenceDistiller, TopKDistillation
from kl_keras.divergence import gaussian_kl_divergence
from kl_keras.layers import KLActivityRegularization, VariationalSampling
from kl_keras.losses import (
    BinaryKLDivergence,
    JeffreysDivergence,
    JensenShannonDivergence,
    KLDivergence,
    ReverseKLDivergence,
    binary_kl_divergence,
    jeffreys_divergence,
    jensen_shannon_divergence,
    kl_divergence,
    kld,
    reverse_kl_divergence,
)
from kl_keras.policy import PolicyKL, policy_kl, policy_kl_from_logits
from kl_keras.regularizers import KLActivityRegularizer

__version__ = "0.3.0"

__all__ = [
    "BinaryKLDivergence",
    "JeffreysDivergence",
    "JensenShannonDivergence",
    "KLActivityRegularization",
    "KLActivityRegularizer",
    "KLDivergence",
    "LogitsDistillation",
    "PolicyKL",
    "ReverseKLDivergence",
    "SequenceDistiller",
    "TopKDistillation",
    "VariationalSampling",
    "__version__",
    "binary_kl_divergence",
    "callbacks",
    "gaussian_kl_divergence",
    "jeffreys_divergence",
    "jensen_shannon_divergence",
    "kl_divergence",
    "kld",
    "metrics",
    "policy",
    "policy_kl",
    "policy_kl_from_logits",
    "reverse_kl_divergence",
    "schedules",
]
