"""Type aliases of the public API, where Keras gives none."""

from typing import Any, TypeAlias

Tensor: TypeAlias = Any
"""A tensor of the active backend (`tf.Tensor`, `jax.Array`, `torch.Tensor`) or anything
`keras.ops.convert_to_tensor` accepts (a NumPy array, nested lists, a Python number).
Keras 3 has no type common to the three backends' tensors, so this alias names the role."""

Config: TypeAlias = dict[str, Any]
"""What `get_config` returns and `from_config` takes."""
