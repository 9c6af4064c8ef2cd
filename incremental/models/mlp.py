"""Multi-layer perceptron backbone for feature vectors (or flattened images)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from incremental.models.layers import check_part, check_widths


class MLP(nn.Module):
    """Dense + ReLU layers over the flattened input; features are the last hidden activation."""

    hidden: Sequence[int] = (256, 256)
    dtype: DTypeLike = jnp.float32
    part: str = "all"  # all | shallow (all layers but the last) | deep (the last): see PARTS
    last_relu: bool = True  # False: features before the last layer's ReLU (LUCIR's official code)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Returns features (B, hidden[-1]); `train` is unused (no BatchNorm or dropout)."""
        del train
        check_widths(self.hidden, "hidden", "MLP")
        check_part(self.part, "MLP")
        if self.part != "all" and len(self.hidden) < 2:
            raise ValueError(
                f"An MLP splits into shallow and deep parts only with two or more hidden layers, "
                f"got hidden={tuple(self.hidden)}; set model.kwargs.hidden=(256, 256), say."
            )
        if x.ndim < 2:
            raise ValueError(f"MLP expects a batch shaped (B, ...), got shape {x.shape}.")
        h = x.reshape((x.shape[0], -1))
        last = len(self.hidden) - 1
        for i, width in enumerate(self.hidden):
            if (self.part == "shallow" and i == last) or (self.part == "deep" and i < last):
                continue
            h = nn.Dense(int(width), dtype=self.dtype, param_dtype=jnp.float32, name=f"dense{i}")(h)
            h = nn.relu(h) if i < last or self.last_relu else h
        return h
