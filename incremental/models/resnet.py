"""ResNets: the CIFAR ResNet-32 of iCaRL/PyCIL/FACIL and the ImageNet ResNet-18.

Where a block changes shape, its shortcut is option A or option B of He et al. 2016:
- 'A' (the CIFAR ResNet's default): the identity, subsampled by the stride and zero-padded to the new
  width, no parameters. PyCIL's resnet32 (`convs/cifar_resnet.py` `DownsampleA`, lines 12-20 at
  87cc4110d60765dc3f64af7ef7a693efed8418ff: a 1x1 average pool of stride 2, then the channels
  concatenated with zeros) and iCaRL's original code use it.
- 'B': a 1x1 conv + BN projection, as torchvision's ResNets (ResNet-18 here) and FACIL's resnet32
  do; 2,752 more parameters in ResNet-32.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from incremental.models.layers import (
    batch_norm,
    check_image_batch,
    check_part,
    conv,
    global_avg_pool,
)

SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a residual; an option-A or -B shortcut when the shape changes."""

    features: int
    stride: int = 1
    dtype: DTypeLike = jnp.float32
    shortcut: str = "B"
    relu_out: bool = True  # False: the block's sum is returned without its ReLU

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns the block output (B, H / stride, W / stride, features)."""
        y = conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
        y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = batch_norm(train, self.dtype, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            if self.shortcut == "A":
                x = x[:, :: self.stride, :: self.stride, :]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.features - x.shape[-1])))
            else:
                x = conv(self.features, 1, self.stride, self.dtype, "shortcut_conv")(x)
                x = batch_norm(train, self.dtype, "shortcut_bn")(x)
        return nn.relu(x + y) if self.relu_out else x + y


def _stages(
    x: jax.Array,
    widths: tuple[int, ...],
    blocks: int,
    train: bool,
    dtype: DTypeLike,
    stages: range | None = None,
    shortcut: str = "B",
    last_relu: bool = True,
) -> jax.Array:
    """Runs `blocks` BasicBlocks per width; every stage after the first starts with stride 2.

    `stages` picks which of the stages to run (all by default), for backbones split in parts;
    `last_relu=False` drops the ReLU at the end of the last stage's last block.
    """
    for s, width in enumerate(widths):
        if stages is not None and s not in stages:
            continue
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            final = s == len(widths) - 1 and b == blocks - 1
            block = BasicBlock(
                width,
                stride,
                dtype,
                shortcut,
                last_relu or not final,
                name=f"stage{s + 1}_block{b}",
            )
            x = block(x, train=train)
    return x


class CifarResNet(nn.Module):
    """CIFAR ResNet-`depth`: 3x3 conv 16, three stages of (depth - 2) / 6 blocks (16/32/64), GAP.

    Features are 64-d. depth=32 gives the ResNet-32 of iCaRL/PyCIL/FACIL; `shortcut` 'A' is PyCIL's
    (and iCaRL's), 'B' FACIL's (module doc).
    """

    depth: int = 32
    dtype: DTypeLike = jnp.float32
    part: str = "all"  # all | shallow (stem, stages 1-2) | deep (stage 3, pooling): see PARTS
    shortcut: str = "A"
    last_relu: bool = True  # False: features before the final ReLU, as LUCIR's official code

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns features (B, 64), or stage 2's activations for `part='shallow'`."""
        if self.depth < 8 or (self.depth - 2) % 6 != 0:
            raise ValueError(
                f"CifarResNet.depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), "
                f"got {self.depth}."
            )
        check_part(self.part, "CifarResNet")
        if self.shortcut not in SHORTCUTS:
            raise ValueError(
                f"CifarResNet.shortcut must be one of {SHORTCUTS} (model.kwargs.shortcut), "
                f"got {self.shortcut!r}."
            )
        check_image_batch(x, "CifarResNet")
        if self.part != "deep":
            x = conv(16, 3, 1, self.dtype, "stem_conv")(x)
            x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
        stages = {"all": range(3), "shallow": range(2), "deep": range(2, 3)}[self.part]
        blocks = (self.depth - 2) // 6
        x = _stages(
            x, (16, 32, 64), blocks, train, self.dtype, stages, self.shortcut, self.last_relu
        )
        return x if self.part == "shallow" else global_avg_pool(x)


class ResNet18(nn.Module):
    """torchvision ResNet-18 without its fc layer; 512-d features.

    `small_input=True` swaps the 7x7 stride-2 stem and max-pool for a 3x3 stride-1 stem, the
    usual choice for 32x32 images.
    """

    small_input: bool = False
    dtype: DTypeLike = jnp.float32
    part: str = "all"  # all | shallow (stem, stages 1-3) | deep (stage 4, pooling): see PARTS
    last_relu: bool = True  # False: features before the final ReLU

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Returns features (B, 512), or stage 3's activations for `part='shallow'`."""
        check_part(self.part, "ResNet18")
        check_image_batch(x, "ResNet18")
        if self.part != "deep":
            kernel, stride = (3, 1) if self.small_input else (7, 2)
            x = conv(64, kernel, stride, self.dtype, "stem_conv")(x)
            x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
            if not self.small_input:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stages = {"all": range(4), "shallow": range(3), "deep": range(3, 4)}[self.part]
        x = _stages(x, (64, 128, 256, 512), 2, train, self.dtype, stages, "B", self.last_relu)
        return x if self.part == "shallow" else global_avg_pool(x)
