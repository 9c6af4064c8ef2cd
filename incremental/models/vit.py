"""Vision Transformer (Dosovitskiy et al. 2021): pre-LN blocks, a [CLS] token, learned positions.

The parameters are named as in google-research/vision_transformer's `.npz` checkpoints (the
ViT-B/16 ImageNet-21k file that L2P and DualPrompt start from), so those files load by name:

    embedding/{kernel (p, p, C, D), bias (D,)}            the patches' linear embedding
    cls (1, 1, D)
    Transformer/posembed_input/pos_embedding (1, 1 + N, D)
    Transformer/encoderblock_{i}/LayerNorm_0/{scale, bias}
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/bias (H, D/H)
    Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/{kernel (H, D/H, D), bias}
    Transformer/encoderblock_{i}/LayerNorm_2/{scale, bias}
    Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel, bias}
    Transformer/encoder_norm/{scale, bias}

The numbers in a block's module names are pre-linen flax's running count, as the files hold them
(linen's per-class count, `MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, is what
big_vision writes; `vit_weights` renames those, and maps timm's names, onto these).

The features are the [CLS] token after the final LayerNorm, so the project's head goes on top. A
block takes two optional extras for the prompt methods: prompt tokens put in front of the sequence
(L2P) and per-layer prefix keys and values (prefix-tuning, DualPrompt); see `ViT.__call__`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from incremental.models.layers import check_image_batch

# (width D, depth, heads, MLP width) of the presets, from the ViT and AugReg papers (Ti: Touvron
# et al. 2021's DeiT-Ti, in the AugReg release as ViT-Ti).
SIZES = {"ti": (192, 12, 3, 768), "s": (384, 12, 6, 1536), "b": (768, 12, 12, 3072)}
GELUS = ("tanh", "erf")  # the tanh approximation: vision_transformer and big_vision; erf: timm

# A prefix for one block: (keys_BxLxD, values_BxLxD), in the attention's key and value space.
Prefix = tuple[jax.Array, jax.Array]


def layer_norm(dtype: DTypeLike, name: str) -> nn.LayerNorm:
    """LayerNorm with epsilon 1e-6, as the ViT checkpoints were trained (flax's and timm's)."""
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class PatchEmbedding(nn.Module):
    """Non-overlapping p x p patches, each flattened and projected to `width`.

    The kernel is that of a VALID convolution of stride p, (p, p, C, D); it is applied as one
    matmul over flattened patches, the same numbers without XLA's convolution paths.
    """

    width: int
    patch: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        """Returns the patch embeddings (B, (H / p) * (W / p), D), patches in row-major order."""
        b, h, w, c = x_BxHxWxC.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(
                f"ViT needs images whose sides are multiples of the patch size {p}, got {h}x{w}; "
                "set model.kwargs.resize to such a side, or another model.kwargs.patch."
            )
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.width,))
        patches = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches_BxNxK = patches.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
        out = jnp.dot(patches_BxNxK, kernel.reshape(p * p * c, self.width).astype(self.dtype))
        return out + bias.astype(self.dtype)[None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with flax's `MultiHeadDotProductAttention` parameters.

    `prefix` (keys_BxLxD, values_BxLxD), if given, is put in front of the projected keys and
    values, in each head's slice of D: prefix-tuning as the official DualPrompt code does it
    (google-research/l2p `models/prefix_attention.py`, after the key and value projections).
    """

    heads: int
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, prefix: Prefix | None = None) -> jax.Array:
        b, _, d = x_BxNxD.shape
        head_dim = d // self.heads
        dense = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.heads, head_dim),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(),
            name=name,
        )
        q_BxNxHxK, k_BxMxHxK, v_BxMxHxK = (dense(n)(x_BxNxD) for n in ("query", "key", "value"))
        if prefix is not None:
            keys, values = (split_heads(t, b, d, self.heads, self.dtype) for t in prefix)
            k_BxMxHxK = jnp.concatenate([keys, k_BxMxHxK], axis=1)
            v_BxMxHxK = jnp.concatenate([values, v_BxMxHxK], axis=1)
        q_BxNxHxK = q_BxNxHxK / jnp.sqrt(head_dim).astype(self.dtype)
        logits_BxHxNxM = jnp.einsum("bnhk,bmhk->bhnm", q_BxNxHxK, k_BxMxHxK)
        weights = jax.nn.softmax(logits_BxHxNxM.astype(jnp.float32), axis=-1).astype(self.dtype)
        mixed_BxNxHxK = jnp.einsum("bhnm,bmhk->bnhk", weights, v_BxMxHxK)
        out = nn.DenseGeneral(
            d,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.xavier_uniform(),
            name="out",
        )
        return out(mixed_BxNxHxK)


def split_heads(tokens_BxLxD: jax.Array, b: int, d: int, heads: int, dtype) -> jax.Array:
    """(B, L, D) prefix tokens as (B, L, H, D / H), after checking their shape."""
    if tokens_BxLxD.ndim != 3 or tokens_BxLxD.shape[0] != b or tokens_BxLxD.shape[2] != d:
        raise ValueError(
            f"A ViT prefix holds (keys, values), each shaped (batch {b}, length, width {d}); "
            f"got shape {tokens_BxLxD.shape}."
        )
    return tokens_BxLxD.reshape(b, tokens_BxLxD.shape[1], heads, d // heads).astype(dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense, with the ViT checkpoints' initialisers."""

    mlp_dim: int
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array) -> jax.Array:
        inits = {
            "kernel_init": nn.initializers.xavier_uniform(),
            "bias_init": nn.initializers.normal(stddev=1e-6),
            "dtype": self.dtype,
            "param_dtype": jnp.float32,
        }
        y = nn.Dense(self.mlp_dim, name="Dense_0", **inits)(x_BxNxD)
        y = nn.gelu(y, approximate=self.gelu == "tanh")
        return nn.Dense(x_BxNxD.shape[-1], name="Dense_1", **inits)(y)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    heads: int
    mlp_dim: int
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x_BxNxD: jax.Array, prefix: Prefix | None = None) -> jax.Array:
        y = layer_norm(self.dtype, "LayerNorm_0")(x_BxNxD)
        attention = Attention(self.heads, self.dtype, name="MultiHeadDotProductAttention_1")
        x_BxNxD = x_BxNxD + attention(y, prefix)
        y = layer_norm(self.dtype, "LayerNorm_2")(x_BxNxD)
        return x_BxNxD + MlpBlock(self.mlp_dim, self.gelu, self.dtype, name="MlpBlock_3")(y)


class Encoder(nn.Module):
    """Position embeddings, prompt tokens in front, the blocks, and the final LayerNorm."""

    depth: int
    heads: int
    mlp_dim: int
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BxNxD: jax.Array,
        prompts_BxPxD: jax.Array | None = None,
        prefixes: Mapping[int, Prefix] | None = None,
    ) -> jax.Array:
        b, n, d = x_BxNxD.shape
        check_extras(prompts_BxPxD, prefixes, b, d, self.depth)
        pos = PositionEmbedding(name="posembed_input")(n, d)
        x_BxNxD = x_BxNxD + pos.astype(self.dtype)
        if prompts_BxPxD is not None:
            x_BxNxD = jnp.concatenate([prompts_BxPxD.astype(self.dtype), x_BxNxD], axis=1)
        prefixes = prefixes or {}
        for i in range(self.depth):
            block = EncoderBlock(
                self.heads, self.mlp_dim, self.gelu, self.dtype, name=f"encoderblock_{i}"
            )
            x_BxNxD = block(x_BxNxD, prefixes.get(i))
        return layer_norm(self.dtype, "encoder_norm")(x_BxNxD)


def check_extras(
    prompts: jax.Array | None, prefixes: Mapping[int, Prefix] | None, b: int, d: int, depth: int
) -> None:
    """Raises ValueError unless the prompts are (B, P, D) and every prefix names a block."""
    if prompts is not None and (prompts.ndim != 3 or prompts.shape[::2] != (b, d)):
        raise ValueError(
            f"ViT prompts must be shaped (batch {b}, length, width {d}), got {prompts.shape}."
        )
    outside = sorted(i for i in prefixes or {} if not 0 <= i < depth)
    if outside:
        raise ValueError(f"ViT prefixes for layers {outside}, but the blocks are 0..{depth - 1}.")


class PositionEmbedding(nn.Module):
    """The learned position embeddings (1, N, D), one per token of the [CLS] + patches sequence."""

    @nn.compact
    def __call__(self, n: int, d: int) -> jax.Array:
        return self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, n, d))


class ViT(nn.Module):
    """Vision Transformer backbone; features are the final-LayerNorm [CLS] token (B, D).

    `size` picks a preset of SIZES ('ti', 's', 'b': ViT-Ti/S/B); `width`, `depth`, `heads` and
    `mlp_dim` override it where > 0 (a tiny ViT for tests: width 32, depth 2, heads 2, mlp_dim 64).
    `resize` > 0 resizes the input images (bilinearly, inside the model) to resize x resize first,
    so small images (8x8 digits) make more than a few patches. Params are float32; `dtype` is the
    compute dtype (bfloat16 on accelerators). `gelu` must be the GELU the weights were trained
    with: 'tanh' (vision_transformer, big_vision) or 'erf' (timm); `vit_weights` says which.
    """

    size: str = "b"
    patch: int = 16
    width: int = 0
    depth: int = 0
    heads: int = 0
    mlp_dim: int = 0
    resize: int = 0
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32

    def dims(self) -> tuple[int, int, int, int]:
        """(width, depth, heads, mlp_dim): the preset's, with the fields set above 0 instead."""
        if self.size not in SIZES:
            raise ValueError(f"ViT.size must be one of {sorted(SIZES)}, got {self.size!r}.")
        if self.gelu not in GELUS:
            raise ValueError(f"ViT.gelu must be one of {GELUS}, got {self.gelu!r}.")
        given = (self.width, self.depth, self.heads, self.mlp_dim)
        width, depth, heads, mlp_dim = (
            g or s for g, s in zip(given, SIZES[self.size], strict=True)
        )
        if min(width, depth, heads, mlp_dim, self.patch) < 1 or width % heads:
            raise ValueError(
                f"ViT needs positive sizes and a width divisible by the heads, got width {width}, "
                f"depth {depth}, heads {heads}, mlp_dim {mlp_dim}, patch {self.patch}."
            )
        return width, depth, heads, mlp_dim

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        prompts: jax.Array | None = None,
        prefixes: Mapping[int, Prefix] | None = None,
        tokens: bool = False,
    ) -> jax.Array:
        """Returns the features (B, D): the [CLS] token after the final LayerNorm.

        Args:
          x: images (B, H, W, C), normalised.
          train: unused (no dropout: the methods built on these checkpoints train without it).
          prompts: (B, P, D) tokens put in front of [CLS], after the position embeddings, as L2P
            does (google-research/l2p `models/vit.py`); [CLS] then sits at position P.
          prefixes: {layer i: (keys_BxLxD, values_BxLxD)}, put in front of block i's projected
            keys and values (`Attention`); layers not in it attend as usual.
          tokens: return the whole sequence (B, P + 1 + N, D) after the final LayerNorm instead.
        """
        del train
        width, depth, heads, mlp_dim = self.dims()
        check_image_batch(x, "ViT")
        if self.resize and x.shape[1:3] != (self.resize, self.resize):
            x = jax.image.resize(
                x.astype(jnp.float32), (x.shape[0], self.resize, self.resize, x.shape[3]), "linear"
            )
        x_BxNxD = PatchEmbedding(width, self.patch, self.dtype, name="embedding")(x)
        cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, width))
        cls_Bx1xD = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, width))
        x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        encoder = Encoder(depth, heads, mlp_dim, self.gelu, self.dtype, name="Transformer")
        out_BxNxD = encoder(x_BxNxD, prompts, prefixes)
        if tokens:
            return out_BxNxD
        return out_BxNxD[:, 0 if prompts is None else prompts.shape[1]]
