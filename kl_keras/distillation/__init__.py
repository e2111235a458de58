"""Knowledge distillation: from logits (a Keras loss, a `keras.distillation` loss) and, at
language-model scale, from hidden states and an output projection, chunk by chunk."""

from kl_keras.distillation.logits import LogitsDistillation
from kl_keras.distillation.sequence import SequenceDistiller, sequence_distillation_loss

__all__ = ["LogitsDistillation", "SequenceDistiller", "sequence_distillation_loss"]

# Their public home: what saved files record as their module, as 0.2 did, and the docs.
for _name in __all__:
    globals()[_name].__module__ = __name__
