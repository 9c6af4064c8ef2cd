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


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy whose sum over classes runs in the head's blocks.

    `optax.softmax_cross_entropy_with_integer_labels` up to float rounding. Its sum of exponentials
    is, like `head_logits`, one fixed-shape reduction per block of HEAD_BLOCK columns, the blocks
    added in order: columns at -inf (classes not seen yet, `mask_unseen`) add exact zeros, so a
    head with a column for every class (`head.capacity`) gives the loss and gradients of the
    narrow head bit for bit, at any number of classes.
    """
    b, c = logits_BxC.shape
    num_blocks = -(-c // HEAD_BLOCK)
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


def cosine_logits(features_BxD: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
    """`sigma` times the cosine similarity of features and each column of `kernel` (float32)."""
    feats = features_BxD.astype(jnp.float32)
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True).clip(1e-12)
    kernel = head["kernel"] / jnp.linalg.norm(head["kernel"], axis=0, keepdims=True).clip(1e-12)
    zeros = jnp.zeros((kernel.shape[1],), jnp.float32)
    return head["sigma"] * head_logits(feats, {"kernel": kernel, "bias": zeros})


def mask_unseen(scores_BxC: jax.Array, num_seen: int | jax.Array) -> jax.Array:
    """`scores` with the columns from `num_seen` on (classes not seen yet) set to -inf.

    For a head with a column for every class (`head.capacity`): softmax gives the masked columns
    probability 0 and gradient 0, and argmax never picks them. `num_seen` may be traced.
    """
    columns_1xC = jnp.arange(scores_BxC.shape[-1])[None, :]
    return jnp.where(columns_1xC < num_seen, scores_BxC, -jnp.inf)


def mask_old(scores_BxC: jax.Array, num_old: int | jax.Array) -> jax.Array:
    """`scores` with the columns before `num_old` (the old classes) set to -inf.

    `cross_entropy(mask_old(logits, num_old), y)` is the cross-entropy over the new classes' logits
    only (PyCIL's and FACIL's `logits[:, known:]` against `y - known`), at any head width.
    """
    columns_1xC = jnp.arange(scores_BxC.shape[-1])[None, :]
    return jnp.where(columns_1xC >= num_old, scores_BxC, -jnp.inf)


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
    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        """Returns `(features_BxD, logits_BxC)`, both float32."""
        features_BxD = self.backbone(x, train=train).astype(jnp.float32)
        return features_BxD, HEADS[self.head_type](self.num_classes, name="head")(features_BxD)
