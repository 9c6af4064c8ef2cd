"""Layers shared by the convolutional backbones: He-initialised convs, BatchNorm, pooling."""

import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def drawn_reshaped(
    init: nn.initializers.Initializer, draw_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
) -> nn.initializers.Initializer:
    """`init` drawn for `draw_shape(shape)` (as many elements, fewer axes), reshaped to `shape`.

    The numbers are `init`'s for `shape` bit for bit (jax.random gives the element at row-major
    position i the draw of counter i whatever the shape, and a reshape keeps that order), but XLA:CPU
    compiles a sampler of a 4-D kernel several times slower than of a matrix: a ResNet-32's init
    program compiled in 39 s, in 4 s with its kernels drawn as matrices. Where `init` scales by the
    fans (`variance_scaling`: the rows are in, the columns out), `draw_shape` keeps the kernel's.
    """

    def init_fn(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return init(key, draw_shape(tuple(shape)), dtype).reshape(shape)

    return init_fn


def flat(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The draw shape of an initializer that has no fans (normal, uniform): one axis."""
    return (math.prod(shape),)


def lecun_normal_row(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """flax's lecun_normal for a dense kernel (D, C), drawn as one row of D * C and reshaped: the
    same numbers (`drawn_reshaped`; fan_in = D is kept in the scale), and drawn eagerly, as
    `surgery.widen_head` draws a head's new columns, a sampler that XLA:CPU compiles about twice as
    fast as the matrix's (2.8 s against 6.1 s for eight shapes)."""
    init = nn.initializers.variance_scaling(1.0 / shape[0], "fan_in", "truncated_normal")
    return init(key, (1, math.prod(shape)), dtype).reshape(shape)


# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") for a conv kernel (H, W, in,
# out): std = sqrt(2 / fan_out), fan_out = H * W * out, the columns of the matrix (in, H * W * out).
KAIMING_FAN_OUT = drawn_reshaped(
    nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
    lambda shape: (shape[-2], math.prod(shape) // shape[-2]),
)
# flax's lecun_normal for a conv kernel (H, W, in, out): fan_in = H * W * in, the rows of the
# matrix (H * W * in, out).
LECUN_NORMAL_CONV = drawn_reshaped(
    nn.initializers.lecun_normal(), lambda shape: (math.prod(shape[:-1]), shape[-1])
)


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
