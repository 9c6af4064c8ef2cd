"""Layers shared by the convolutional backbones: He-initialised convs, BatchNorm, pooling."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / fan_out).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int, dtype: DTypeLike, name: str) -> nn.Conv:
    """Returns a bias-free square conv with torch-style symmetric padding of kernel // 2."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        # Explicit padding: "SAME" pads (0, 1) for stride 2 where torch pads (1, 1).
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=KAIMING_FAN_OUT,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def batch_norm(train: bool, dtype: DTypeLike, name: str) -> nn.BatchNorm:
    """Returns a BatchNorm with torch defaults that updates `batch_stats` only when training."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def global_avg_pool(x_BxHxWxC: jax.Array) -> jax.Array:
    """Averages over the spatial axes: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x_BxHxWxC, axis=(1, 2))


def check_image_batch(x: jax.Array, model: str) -> None:
    """Raises ValueError unless `x` is a (B, H, W, C) batch."""
    if x.ndim != 4:
        raise ValueError(
            f"{model} expects images shaped (B, H, W, C), got shape {x.shape}; "
            "reshape feature vectors to images or use the 'mlp' model."
        )


def check_widths(widths: Sequence[int], field: str, model: str) -> None:
    """Raises ValueError unless `widths` is a non-empty sequence of positive ints."""
    if len(widths) == 0 or any(int(w) < 1 for w in widths):
        raise ValueError(
            f"{model}.{field} must be a non-empty sequence of positive ints, got {widths!r}."
        )


# A backbone in two parts (MEMO's shared shallow layers and per-phase deep layers): `part='shallow'`
# gives the activations where `part='deep'` starts; `'all'` is the two in sequence.
PARTS = ("all", "shallow", "deep")


def check_part(part: str, model: str) -> None:
    if part not in PARTS:
        raise ValueError(f"{model}.part must be one of {PARTS}, got {part!r}.")
