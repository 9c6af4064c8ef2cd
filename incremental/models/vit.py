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

`ViT(adapter=r)` adds AdaptFormer bottleneck adapters (Chen et al. 2022), `adapter_sets` sets of one
per block, for the adapter methods (`aper`, `ease`). They sit beside the ViT's own parameters, at

    adapter/set_{k}/encoderblock_{i}/{down_kernel (D, r), down_bias (r,), up_kernel (r, D), up_bias (D,)}

outside `embedding`, `cls` and `Transformer`, so a pre-trained checkpoint leaves them as initialised
(`phase.pretrained.VIT_PARTS`). With `adapter=0` (the default) there are none and the parameter tree
is the plain ViT's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from incremental.models.layers import LECUN_NORMAL_CONV, check_image_batch, drawn_reshaped, flat

# (width D, depth, heads, MLP width) of the presets, from the ViT and AugReg papers (Ti: Touvron
# et al. 2021's DeiT-Ti, in the AugReg release as ViT-Ti).
SIZES = {"ti": (192, 12, 3, 768), "s": (384, 12, 6, 1536), "b": (768, 12, 12, 3072)}
GELUS = ("tanh", "erf")  # the tanh approximation: vision_transformer and big_vision; erf: timm

# A prefix for one block: (keys_BxLxD, values_BxLxD), in the attention's key and value space.
Prefix = tuple[jax.Array, jax.Array]
# One block's adapter weights: {down_kernel, down_bias, up_kernel, up_bias} (`BlockAdapter`).
AdapterWeights = Mapping[str, jax.Array]


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
        kernel = self.param("kernel", LECUN_NORMAL_CONV, (p, p, c, self.width))
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


class BlockAdapter(nn.Module):
    """One block's AdaptFormer adapter weights, initialised as LAMDA-PILOT's `Adapter` with
    `init_option="lora"` (backbone/vit_adapter.py lines 63-68): the down-projection as PyTorch's
    `kaiming_uniform_(a=sqrt(5))`, U(-1/sqrt(D), 1/sqrt(D)); the up-projection and both biases
    zero, so the adapter adds exactly zero until it is trained."""

    bottleneck: int

    @nn.compact
    def __call__(self, width: int) -> dict[str, jax.Array]:
        r, zeros = self.bottleneck, nn.initializers.zeros_init()
        down_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
        return {
            "down_kernel": self.param("down_kernel", down_init, (width, r), jnp.float32),
            "down_bias": self.param("down_bias", zeros, (r,), jnp.float32),
            "up_kernel": self.param("up_kernel", zeros, (r, width), jnp.float32),
            "up_bias": self.param("up_bias", zeros, (width,), jnp.float32),
        }


class AdapterSet(nn.Module):
    """One `BlockAdapter` per block: `encoderblock_{i}/...`."""

    bottleneck: int
    depth: int

    @nn.compact
    def __call__(self, width: int) -> list[dict[str, jax.Array]]:
        return [
            BlockAdapter(self.bottleneck, name=f"encoderblock_{i}")(width)
            for i in range(self.depth)
        ]


class AdapterBank(nn.Module):
    """`sets` adapter sets, `set_{k}/encoderblock_{i}/...`."""

    bottleneck: int
    sets: int
    depth: int

    @nn.compact
    def __call__(self, width: int) -> list[list[dict[str, jax.Array]]]:
        """Every set's weights, [set][block]; all are created (at init) whichever is used."""
        return [
            AdapterSet(self.bottleneck, self.depth, name=f"set_{k}")(width)
            for k in range(self.sets)
        ]


def adapter_output(x_BxNxD: jax.Array, weights: AdapterWeights, scale: float, dtype) -> jax.Array:
    """AdaptFormer's parallel branch, `scale * up(relu(down(x)))` (PILOT's `Adapter.forward` with
    `adapter_layernorm_option="none"`, backbone/vit_adapter.py lines 70-90; its dropout of 0.1 is
    left out, as this ViT has none)."""
    bias = lambda name: weights[name].astype(dtype)[None, None, :]  # noqa: E731
    down_BxNxR = jnp.dot(x_BxNxD, weights["down_kernel"].astype(dtype)) + bias("down_bias")
    up_BxNxD = jnp.dot(nn.relu(down_BxNxR), weights["up_kernel"].astype(dtype)) + bias("up_bias")
    return up_BxNxD * jnp.asarray(scale, dtype)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attention(LN(x)), then x + MLP(LN(x)).

    With `adapter` weights, an AdaptFormer adapter runs parallel to the MLP on the same stream x
    (before the LayerNorm) and its output is added to the MLP's: x + (MLP(LN(x)) + adapter(x)), as
    PILOT's `Block.forward` with `ffn_option="parallel"` (backbone/vit_adapter.py lines 165-183).
    """

    heads: int
    mlp_dim: int
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32
    adapter_scale: float = 0.1

    @nn.compact
    def __call__(
        self,
        x_BxNxD: jax.Array,
        prefix: Prefix | None = None,
        adapter: AdapterWeights | None = None,
    ) -> jax.Array:
        y = layer_norm(self.dtype, "LayerNorm_0")(x_BxNxD)
        attention = Attention(self.heads, self.dtype, name="MultiHeadDotProductAttention_1")
        x_BxNxD = x_BxNxD + attention(y, prefix)
        y = layer_norm(self.dtype, "LayerNorm_2")(x_BxNxD)
        mlp = MlpBlock(self.mlp_dim, self.gelu, self.dtype, name="MlpBlock_3")(y)
        if adapter is not None:
            mlp = mlp + adapter_output(x_BxNxD, adapter, self.adapter_scale, self.dtype)
        return x_BxNxD + mlp


class Encoder(nn.Module):
    """Position embeddings, prompt tokens in front, the blocks, and the final LayerNorm."""

    depth: int
    heads: int
    mlp_dim: int
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32
    adapter_scale: float = 0.1

    @nn.compact
    def __call__(
        self,
        x_BxNxD: jax.Array,
        prompts_BxPxD: jax.Array | None = None,
        prefixes: Mapping[int, Prefix] | None = None,
        adapters: Sequence[AdapterWeights] | None = None,
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
                self.heads,
                self.mlp_dim,
                self.gelu,
                self.dtype,
                self.adapter_scale,
                name=f"encoderblock_{i}",
            )
            x_BxNxD = block(x_BxNxD, prefixes.get(i), None if adapters is None else adapters[i])
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


# N(0, 0.02^2) drawn as one vector (`drawn_reshaped`: the same numbers, fewer axes to compile).
POSITION_INIT = drawn_reshaped(nn.initializers.normal(stddev=0.02), flat)


class PositionEmbedding(nn.Module):
    """The learned position embeddings (1, N, D), one per token of the [CLS] + patches sequence."""

    @nn.compact
    def __call__(self, n: int, d: int) -> jax.Array:
        return self.param("pos_embedding", POSITION_INIT, (1, n, d))


class ViT(nn.Module):
    """Vision Transformer backbone; features are the final-LayerNorm [CLS] token (B, D).

    `size` picks a preset of SIZES ('ti', 's', 'b': ViT-Ti/S/B); `width`, `depth`, `heads` and
    `mlp_dim` override it where > 0 (a tiny ViT for tests: width 32, depth 2, heads 2, mlp_dim 64).
    `resize` > 0 resizes the input images (inside the model, `interpolation` 'linear' or 'cubic')
    to resize x resize first, so small images (8x8 digits) make more than a few patches; with
    `center_crop` < 1 to resize / center_crop instead, keeping the central resize x resize:
    torchvision's Resize(256) + CenterCrop(224) at 0.875, the test transform of PILOT's ViTs (an
    input already resize x resize, as a training crop is, passes unchanged). Params are float32; `dtype` is the
    compute dtype (bfloat16 on accelerators). `gelu` must be the GELU the weights were trained
    with: 'tanh' (vision_transformer, big_vision) or 'erf' (timm); `vit_weights` says which.
    `adapter` > 0 adds `adapter_sets` sets of AdaptFormer adapters of that bottleneck width, whose
    outputs are scaled by `adapter_scale` (`EncoderBlock`); 0: none.
    """

    size: str = "b"
    patch: int = 16
    width: int = 0
    depth: int = 0
    heads: int = 0
    mlp_dim: int = 0
    resize: int = 0
    center_crop: float = 1.0
    interpolation: str = "linear"
    gelu: str = "tanh"
    dtype: DTypeLike = jnp.float32
    adapter: int = 0
    adapter_sets: int = 1
    adapter_scale: float = 0.1

    def resized(self, x: jax.Array) -> jax.Array:
        """`x` as resize x resize images (`resize`, `center_crop`, `interpolation`)."""
        if not self.resize or x.shape[1:3] == (self.resize, self.resize):
            return x
        if not 0 < self.center_crop <= 1 or self.interpolation not in ("linear", "cubic"):
            raise ValueError(
                f"ViT needs 0 < center_crop <= 1 and interpolation 'linear' or 'cubic', got "
                f"{self.center_crop} and {self.interpolation!r}."
            )
        side = round(self.resize / self.center_crop)
        shape = (x.shape[0], side, side, x.shape[3])
        x = jax.image.resize(x.astype(jnp.float32), shape, self.interpolation)
        top = round((side - self.resize) / 2)  # torchvision's CenterCrop offset
        return x[:, top : top + self.resize, top : top + self.resize]

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
        if self.adapter < 0 or self.adapter_sets < 1:
            raise ValueError(
                f"ViT needs adapter >= 0 (0: none) and adapter_sets >= 1, got adapter "
                f"{self.adapter}, adapter_sets {self.adapter_sets}."
            )
        return width, depth, heads, mlp_dim

    def adapters(self, width: int, depth: int, adapter_set: int | None):
        """Set `adapter_set`'s weights per block, or None (no adapters, or `adapter_set` None)."""
        if not self.adapter:
            return None
        bank = AdapterBank(self.adapter, self.adapter_sets, depth, name="adapter")(width)
        if adapter_set is None:
            return None
        if not 0 <= adapter_set < self.adapter_sets:
            raise ValueError(
                f"ViT adapter_set {adapter_set} is not one of its {self.adapter_sets} adapter sets."
            )
        return bank[adapter_set]

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        prompts: jax.Array | None = None,
        prefixes: Mapping[int, Prefix] | None = None,
        tokens: bool = False,
        adapter_set: int | None = 0,
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
          adapter_set: which adapter set the blocks apply (with `adapter` > 0); None: none, the
            pre-trained model itself (bit for bit, as the same parameters without adapters give).
        """
        del train
        width, depth, heads, mlp_dim = self.dims()
        check_image_batch(x, "ViT")
        x = self.resized(x)
        x_BxNxD = PatchEmbedding(width, self.patch, self.dtype, name="embedding")(x)
        cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, width))
        cls_Bx1xD = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, width))
        x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        encoder = Encoder(
            depth, heads, mlp_dim, self.gelu, self.dtype, self.adapter_scale, name="Transformer"
        )
        out_BxNxD = encoder(x_BxNxD, prompts, prefixes, self.adapters(width, depth, adapter_set))
        if tokens:
            return out_BxNxD
        return out_BxNxD[:, 0 if prompts is None else prompts.shape[1]]
