"""Knowledge distillation: from logits (a Keras loss, a `keras.distillation` loss), at
language-model scale from hidden states and an output projection, chunk by chunk, and
offline from a teacher's stored top-k."""

from kl_keras.distillation.logits import LogitsDistillation
from kl_keras.distillation.sequence import (
    SequenceDistiller,
    sequence_distillation_loss,
    sequence_top_k_distillation_loss,
)
from kl_keras.distillation.top_k import (
    TopKDataset,
    TopKDistillation,
    pack_top_k,
    teacher_top_k,
    unpack_top_k,
)

__all__ = [
    "LogitsDistillation",
    "SequenceDistiller",
    "TopKDataset",
    "TopKDistillation",
    "pack_top_k",
    "sequence_distillation_loss",
    "sequence_top_k_distillation_loss",
    "teacher_top_k",
    "unpack_top_k",
]

# Their public home: what saved files record as their module, as 0.2 did, and the docs.
for _name in __all__:
    globals()[_name].__module__ = __name__
