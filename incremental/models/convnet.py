"""A small conv net for small images (8x8 digits, 28x28 MNIST, 32x32 CIFAR)."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from incremental.models.layers import (
    batch_norm,
    check_image_batch,
    check_widths,
    conv,
    global_avg_pool,
)


class ConvNet(nn.Module):
    """[Conv3x3 -> BN -> ReLU -> max-pool 2x2] per channel count, then GAP -> Dense -> ReLU.

    Pooling is skipped once a spatial side is below 2, so any input size works.
    """

    channels: Sequence[int] = (32, 64)
    dense: int = 128
    dtype: DTypeLike = jnp.float32
    last_relu: bool = True  # False: features before the dense layer's ReLU

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns features (B, dense)."""
        check_image_batch(x, "ConvNet")
        check_widths(self.channels, "channels", "ConvNet")
        check_widths((self.dense,), "dense", "ConvNet")
        for i, width in enumerate(self.channels):
            x = conv(int(width), 3, 1, self.dtype, f"conv{i}")(x)
            x = nn.relu(batch_norm(train, self.dtype, f"bn{i}")(x))
            if min(x.shape[1], x.shape[2]) >= 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = global_avg_pool(x)
        x = nn.Dense(int(self.dense), dtype=self.dtype, param_dtype=jnp.float32, name="dense")(x)
        return nn.relu(x) if self.last_relu else x
