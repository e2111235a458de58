"""kl_keras: Kullback-Leibler divergence for Keras 3, exact and serializable."""

from kl_keras.losses import KLDivergence, kl_divergence, kld
from kl_keras.regularizers import KLActivityRegularizer

__version__ = "0.1.0"

__all__ = [
    "KLActivityRegularizer",
    "KLDivergence",
    "__version__",
    "kl_divergence",
    "kld",
]
