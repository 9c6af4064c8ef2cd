"""Backbone + linear head: the one model shape every method trains."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Head columns are computed in blocks of this width, each by the same fixed-shape matmul.
HEAD_BLOCK = 128


def head_logits(features_BxD: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
    """Computes float32 logits `features @ kernel + bias` for head params {'kernel', 'bias'}.

    A plain (D, C) matmul changes its summation order with C, so widening the head would move
    old logits by an ulp. Every block of HEAD_BLOCK columns is instead computed by one matmul of
    fixed shape in a loop, which makes old logits bit-identical after the head is widened. The
    bias is added inside the blocks too, so its gradient (a sum over the batch) also has a fixed
    shape, and a head with more columns trains its first ones bit for bit alike (`head.capacity`).
    """
    kernel_DxC, bias_C = head["kernel"], head["bias"]
    d, c = kernel_DxC.shape
    num_blocks = -(-c // HEAD_BLOCK)
    pad = num_blocks * HEAD_BLOCK - c
    blocks_NxDxK = jnp.pad(kernel_DxC, ((0, 0), (0, pad))).reshape(d, num_blocks, HEAD_BLOCK)
    blocks_NxDxK = blocks_NxDxK.transpose(1, 0, 2)
    bias_NxK = jnp.pad(bias_C, (0, pad)).reshape(num_blocks, HEAD_BLOCK)
    feats_BxD = features_BxD.astype(jnp.float32)

    def block(kernel_and_bias):
        k_DxK, b_K = kernel_and_bias
        return jnp.dot(feats_BxD, k_DxK, precision=lax.Precision.HIGHEST) + b_K[None, :]

    out_NxBxK = lax.map(block, (blocks_NxDxK, bias_NxK))
    return out_NxBxK.transpose(1, 0, 2).reshape(feats_BxD.shape[0], -1)[:, :c]


def sum_classes(values_BxC: jax.Array) -> jax.Array:
    """Per-example sum over classes (B,), one fixed-shape reduction per block of HEAD_BLOCK columns.

    The blocks are added in order, so columns of exact zeros (classes masked out) leave the sum of
    the others bit for bit as it is at any head width: what makes `head.capacity` exact.
    """
    b, c = values_BxC.shape
    num_blocks = -(-c // HEAD_BLOCK)
    padded_BxP = jnp.pad(values_BxC, ((0, 0), (0, num_blocks * HEAD_BLOCK - c)))
    blocks_NxBxK = padded_BxP.reshape(b, num_blocks, HEAD_BLOCK).transpose(1, 0, 2)
    sums_NxB = lax.map(lambda x_BxK: x_BxK.sum(axis=-1), blocks_NxBxK)
    total_B = sums_NxB[0]
    for block in range(1, num_blocks):
        total_B = total_B + sums_NxB[block]
    return total_B


def log_softmax(logits_BxC: jax.Array, num_valid: int | jax.Array | None = None) -> jax.Array:
    """`jax.nn.log_softmax` over the first `num_valid` columns (all by default), summed in blocks
    (`sum_classes`); the other columns are -inf. `num_valid` may be traced, and 0 gives all -inf
    with finite gradients."""
    if num_valid is not None:
        logits_BxC = mask_unseen(logits_BxC, num_valid)
    max_Bx1 = lax.stop_gradient(logits_BxC.max(axis=-1, keepdims=True))
    max_Bx1 = jnp.where(jnp.isfinite(max_Bx1), max_Bx1, 0.0)  # no valid column
    shifted_BxC = logits_BxC - max_Bx1
    total_B = sum_classes(jnp.exp(shifted_BxC))
    total_B = jnp.where(total_B > 0, total_B, 1.0)
    return shifted_BxC - jnp.log(total_B)[:, None]


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy whose sum over classes runs in the head's blocks.

    `optax.softmax_cross_entropy_with_integer_labels` up to float rounding. Its sum of exponentials
    is summed like `sum_classes`: columns at -inf (classes not seen yet, `mask_unseen`) add exact zeros, so a
    head with a column for every class (`head.capacity`) gives the loss and gradients of the
    narrow head bit for bit, at any number of classes.
    """
    b, c = logits_BxC.shape
    num_blocks = -(-c // HEAD_BLOCK)
    # Padded with -inf before the exponential (not `sum_classes` of exp with zeros after it):
    # XLA fuses the two forms differently, and this one is what the gradients were checked with.
    padded_BxP = jnp.pad(
        logits_BxC, ((0, 0), (0, num_blocks * HEAD_BLOCK - c)), constant_values=-jnp.inf
    )
    max_Bx1 = lax.stop_gradient(padded_BxP.max(axis=-1, keepdims=True))
    blocks_NxBxK = (padded_BxP - max_Bx1).reshape(b, num_blocks, HEAD_BLOCK).transpose(1, 0, 2)
    sums_NxB = lax.map(lambda x_BxK: jnp.exp(x_BxK).sum(axis=-1), blocks_NxBxK)
    total_B = sums_NxB[0]
    for block in range(1, num_blocks):
        total_B = total_B + sums_NxB[block]
    label_logits_B = jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=-1)[:, 0]
    return max_Bx1[:, 0] + jnp.log(total_B) - label_logits_B


def soft_cross_entropy(
    logits_BxC: jax.Array, targets_BxC: jax.Array, num_valid: int | jax.Array | None = None
) -> jax.Array:
    """`-sum_c targets_c log_softmax(logits)_c` over the first `num_valid` columns (all by
    default): `optax.softmax_cross_entropy` up to float rounding, exact under `head.capacity`.

    Written as `lse * sum_c t_c - sum_c t_c (z_c - max)`, every sum over classes a `sum_classes`:
    a per-example log-sum-exp broadcast over the columns would make the backward pass sum over
    them in a plain reduction, whose order changes with the head's width.
    """
    num_valid = logits_BxC.shape[-1] if num_valid is None else num_valid
    valid_1xC = columns_below(logits_BxC, num_valid)
    masked_BxC = jnp.where(valid_1xC, logits_BxC, -jnp.inf)
    max_Bx1 = lax.stop_gradient(masked_BxC.max(axis=-1, keepdims=True))
    max_Bx1 = jnp.where(jnp.isfinite(max_Bx1), max_Bx1, 0.0)  # no valid column
    shifted_BxC = masked_BxC - max_Bx1
    total_B = sum_classes(jnp.exp(shifted_BxC))
    lse_B = jnp.log(jnp.where(total_B > 0, total_B, 1.0))
    targets_BxC = jnp.where(valid_1xC, targets_BxC, 0.0)
    weighted_B = sum_classes(jnp.where(valid_1xC, targets_BxC * shifted_BxC, 0.0))
    return lse_B * sum_classes(targets_BxC) - weighted_B


class Head(nn.Module):
    """Linear float32 head with nn.Dense's params and init, computed by `head_logits`."""

    num_classes: int

    @nn.compact
    def __call__(self, features_BxD: jax.Array) -> jax.Array:
        """Returns float32 logits (B, num_classes)."""
        shape = (features_BxD.shape[-1], self.num_classes)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,), jnp.float32)
        return head_logits(features_BxD, {"kernel": kernel, "bias": bias})


class CosineHead(nn.Module):
    """Cosine-normalised head with a learnable scale (LUCIR, Hou et al. 2019).

    logits = sigma * <f / |f|, w_c / |w_c|>, so |logits| <= |sigma|. Params: `kernel` (D, C), `sigma`.
    """

    num_classes: int

    @nn.compact
    def __call__(self, features_BxD: jax.Array) -> jax.Array:
        shape = (features_BxD.shape[-1], self.num_classes)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        sigma = self.param("sigma", nn.initializers.ones_init(), (), jnp.float32)
        return cosine_logits(features_BxD, {"kernel": kernel, "sigma": sigma})


def unit(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / max(|x|, 1e-12)` along `axis`, whose gradient at a zero vector is zero, not NaN (the
    zero columns of a `head.capacity` head for classes not seen yet). Features, class means and
    cosine heads are all normalised with it."""
    squares = jnp.sum(x * x, axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(squares, 1e-24))


def cosine_logits(features_BxD: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
    """`sigma` times the cosine similarity of features and each column of `kernel` (float32)."""
    feats = unit(features_BxD.astype(jnp.float32), axis=-1)
    kernel = unit(head["kernel"], axis=0)
    zeros = jnp.zeros((kernel.shape[1],), jnp.float32)
    return head["sigma"] * head_logits(feats, {"kernel": kernel, "bias": zeros})


def columns_below(scores_BxC: jax.Array, num: int | jax.Array) -> jax.Array:
    """(1, C) booleans: True for the columns before `num` (which may be traced)."""
    return jnp.arange(scores_BxC.shape[-1])[None, :] < num


def mask_unseen(scores_BxC: jax.Array, num_seen: int | jax.Array) -> jax.Array:
    """`scores` with the columns from `num_seen` on (classes not seen yet) set to -inf.

    For a head with a column for every class (`head.capacity`): softmax gives the masked columns
    probability 0 and gradient 0, and argmax never picks them. `num_seen` may be traced.
    """
    return jnp.where(columns_below(scores_BxC, num_seen), scores_BxC, -jnp.inf)


def mask_old(scores_BxC: jax.Array, num_old: int | jax.Array) -> jax.Array:
    """`scores` with the columns before `num_old` (the old classes) set to -inf.

    `cross_entropy(mask_old(logits, num_old), y)` is the cross-entropy over the new classes' logits
    only (PyCIL's and FACIL's `logits[:, known:]` against `y - known`), at any head width.
    """
    return jnp.where(columns_below(scores_BxC, num_old), -jnp.inf, scores_BxC)


def mask_other_phases(
    scores_BxC: jax.Array, labels_B: jax.Array, offsets: tuple[int, ...]
) -> jax.Array:
    """`scores` with every column outside the head block of the phase that owns each example's
    label set to -inf: phase p's block is `[offsets[p], offsets[p + 1])` (the task scenario, where
    the task label picks the block). Columns past `offsets[-1]` belong to no phase.

    >>> scores = jnp.zeros((2, 4))
    >>> mask_other_phases(scores, jnp.array([0, 3]), (0, 2, 4)).tolist()
    [[0.0, 0.0, -inf, -inf], [-inf, -inf, 0.0, 0.0]]
    """
    bounds = jnp.asarray(offsets[1:])
    phase_C = jnp.searchsorted(bounds, jnp.arange(scores_BxC.shape[-1]), side="right")
    own_B = phase_C[labels_B]
    return jnp.where(phase_C[None, :] == own_B[:, None], scores_BxC, -jnp.inf)


HEADS = {"linear": Head, "cosine": CosineHead}


class Classifier(nn.Module):
    """A backbone followed by a float32 linear head named `head`.

    Params are `{'backbone': ..., 'head': {'kernel': (D, C), 'bias': (C,)}}`. The backbone
    may compute in bf16; its features are cast to float32 before the head, so
    `head_logits(features, params['head'])` reproduces the logits exactly.
    """

    backbone: nn.Module
    num_classes: int
    head_type: str = "linear"  # linear | cosine

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool, **backbone_kwargs
    ) -> tuple[jax.Array, jax.Array]:
        """Returns `(features_BxD, logits_BxC)`, both float32; `backbone_kwargs` go to the
        backbone (the phase, for a backbone that takes it: `Method.phase_input`)."""
        features_BxD = self.backbone(x, train=train, **backbone_kwargs).astype(jnp.float32)
        return features_BxD, HEADS[self.head_type](self.num_classes, name="head")(features_BxD)
