"""Pre-trained ViT weights from the files people have, mapped onto `models.vit.ViT`'s parameters.

Three layouts load (`load(path, target)`):

- google-research/vision_transformer `.npz` (the ImageNet-21k ViT-B/16 of L2P and DualPrompt, the
  AugReg files): `ViT`'s own names (see models/vit.py), keys joined by '/'.
- google-research/big_vision `.npz`: the same modules named by linen's per-class count
  (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`), the position embeddings at
  the top (`pos_embedding`, or `Transformer/pos_embedding` in files from before 2022) and added
  before the [CLS] token is put in front, so that they have no [CLS] row: a zero row is given to
  it, which computes the same. A scanned encoder (`Transformer/encoderblock/...`, the blocks
  stacked on a leading axis) is unstacked; a `params/` or `params/img/` prefix is dropped.
  timm's `_load_weights` (timm/models/vision_transformer.py) reads the two `.npz` layouts with the
  same correspondence.
- timm `.safetensors` (read with the `safetensors` package's numpy API, no torch):
  `cls_token`, `pos_embed`, `patch_embed.proj.{weight,bias}`, `blocks.N.norm1`,
  `blocks.N.attn.qkv` (query, key and value stacked on the output axis, each head-major),
  `blocks.N.attn.proj`, `blocks.N.norm2`, `blocks.N.mlp.fc1/fc2`, `norm`; torch's Linear weight
  is (out, in), a Conv2d's (out, in, h, w). A `.safetensors` file does not say how many heads the
  qkv rows hold: the model's are used, so the model must have the checkpoint's heads.

A classifier's own layers (`head`, `pre_logits`; timm's `head`) are dropped, and named in the
`Recipe` the loader returns, with the input normalisation the weights were trained with: (0.5,
0.5) per channel for the `.npz` files (inputs in [-1, 1]); for timm the `pretrained_cfg` mean and
std of a `config.json` beside the file (the Hugging Face hub's layout), else ImageNet's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import traverse_util

from incremental.models.vit import SIZES

PyTree = Any
HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NPZ_PREFIXES = ("opt/target/", "params/img/", "params/")  # old vision_transformer; big_vision
CLASSIFIER = ("head", "pre_logits")  # the file's classifier: the project's head replaces it
POSEMB = "Transformer/posembed_input/pos_embedding"
LINEN_NAMES = {  # big_vision's block modules -> vision_transformer's (pre-linen numbering)
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What goes with a checkpoint's weights, so that a user need not know it."""

    layout: str  # vision_transformer | big_vision | timm
    mean: tuple[float, ...]  # per channel, of images scaled to [0, 1]
    std: tuple[float, ...]
    gelu: str  # the GELU of the code that trained them (ViT.gelu): tanh | erf
    dropped: tuple[str, ...] = ()  # the file's parameters left out (its classifier head)
    resized: tuple[str, ...] = ()  # parameters resampled to the model's shape (position grid)


def recipe(path: str) -> Recipe:
    """The recipe of the checkpoint at `path`, from its names alone (no arrays are read)."""
    kind = _kind(path)
    if kind == "npz":
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
        return Recipe(_npz_layout(names), HALF, HALF, "tanh")
    mean, std = _timm_normalisation(path)
    return Recipe("timm", mean, std, "erf")


def read(path: str, heads: int) -> tuple[dict[str, np.ndarray], dict[str, str], Recipe]:
    """The checkpoint's arrays under `ViT`'s names ('/'-joined), the file's name of each, and its
    recipe; the classifier's arrays are left out and named in `Recipe.dropped`. `heads` splits a
    timm qkv projection."""
    if _kind(path) == "npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {name: f[name] for name in f.files}
        found, sources, dropped = _from_npz(arrays)
        return found, sources, Recipe(_npz_layout(list(arrays)), HALF, HALF, "tanh", dropped)
    from safetensors.numpy import load_file

    found, sources, dropped = _from_timm(load_file(path), heads)
    mean, std = _timm_normalisation(path)
    return found, sources, Recipe("timm", mean, std, "erf", dropped)


def load(path: str, target: PyTree) -> tuple[PyTree, Recipe]:
    """The checkpoint at `path` as a tree like `target` (a ViT's params, or their shapes).

    Every parameter of `target` must be in the file with its shape, and nothing but the file's
    classifier may be left over; otherwise a ValueError names the first path that is missing,
    unexpected or of another shape (in the model's forward order), describes the checkpoint's and
    the model's sizes, and says which model size to choose. The position embeddings of another
    square grid (another image size) are resampled as vision_transformer does (`resample_posemb`).
    """
    want = traverse_util.flatten_dict(dict(target), sep="/")
    heads = _heads(want)
    found, sources, info = read(path, heads)
    resized = resample_posemb(found, want)
    bad = problems(found, want, sources)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValueError(
            f"model.pretrained: {path} does not fit the configured ViT: {bad[0]}{more}. The "
            f"checkpoint is {describe(found)}; the model is {describe(want)}. Choose the matching "
            f"model size: {advice(found)}."
        )
    leaves = {k: np.asarray(found[k], dtype=want[k].dtype) for k in want}
    info = dataclasses.replace(info, resized=resized)
    return traverse_util.unflatten_dict(leaves, sep="/"), info


def save_npz(path: str, params: PyTree) -> None:
    """Writes a ViT's params as a vision_transformer `.npz` (keys joined by '/'), which `load`
    reads back bit for bit."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def problems(
    found: dict[str, Any], want: dict[str, Any], sources: dict[str, str] | None = None
) -> list[str]:
    """Every parameter that is missing, unexpected or of another shape, in forward order."""
    sources = sources or {}
    out = []
    for key in sorted(set(found) | set(want), key=forward_order):
        name = key if sources.get(key, key) == key else f"{key} ({sources[key]} in the file)"
        if key not in found:
            out.append(f"{key} is missing from the checkpoint (the model's has shape "
                       f"{tuple(want[key].shape)})")  # fmt: skip
        elif key not in want:
            out.append(f"{name} is in the checkpoint but not in the model")
        elif tuple(np.shape(found[key])) != tuple(want[key].shape):
            out.append(f"{name} has shape {tuple(np.shape(found[key]))}, the model's "
                       f"{tuple(want[key].shape)}")  # fmt: skip
    return out


def forward_order(key: str) -> tuple:
    """Sorts paths as the forward pass meets them: embedding, [CLS], positions, blocks in order
    (a block's modules by their pre-linen number, which is that order), the final norm; within a
    module, its kernel or scale before its bias."""
    parts = key.split("/")
    module, leaf = key.rpartition("/")[0], int(parts[-1] == "bias")
    block = re.fullmatch(r"Transformer/encoderblock_(\d+)", "/".join(parts[:2]))
    if block:
        number = re.search(r"_(\d+)$", parts[2]) if len(parts) > 2 else None
        return (3, int(block.group(1)), int(number.group(1)) if number else 0, module, leaf, key)
    first = {"embedding": 0, "cls": 1}.get(parts[0])
    if first is None:
        first = 2 if key.startswith("Transformer/posembed") else 4 if "encoder_norm" in key else 5
    return (first, 0, 0, module, leaf, key)


def describe(flat: dict[str, Any]) -> str:
    """'depth 12, width 768, 12 heads, MLP 3072, patch 16 (ViT-B/16)' from a flat params dict."""
    width, depth, heads, mlp, patch = _dims(flat)
    preset = _preset(width, depth, heads, mlp)
    name = f" (ViT-{preset.upper().replace('TI', 'Ti')}/{patch})" if preset else ""
    return f"depth {depth}, width {width}, {heads} heads, MLP {mlp}, patch {patch}{name}"


def advice(found: dict[str, Any]) -> str:
    """The model.kwargs that build the checkpoint's ViT."""
    width, depth, heads, mlp, patch = _dims(found)
    preset = _preset(width, depth, heads, mlp)
    if preset:
        return (f"model.kwargs.size='{preset}' with width, depth, heads and mlp_dim at 0, and "
                f"model.kwargs.patch={patch}")  # fmt: skip
    return (f"model.kwargs.width={width}, depth={depth}, heads={heads}, mlp_dim={mlp}, "
            f"patch={patch}")  # fmt: skip


def resample_posemb(found: dict[str, Any], want: dict[str, Any]) -> tuple[str, ...]:
    """Resamples the file's position grid to the model's in place when only the grid differs:
    bilinear (`scipy.ndimage.zoom`, order 1) as vision_transformer's `interpolate_posembed`, the
    [CLS] row kept. Returns the paths resampled."""
    if POSEMB not in found or POSEMB not in want or np.ndim(found[POSEMB]) != 3:
        return ()
    (_, n_old, d_old), (_, n_new, d_new) = np.shape(found[POSEMB]), want[POSEMB].shape
    g_old, g_new = round((n_old - 1) ** 0.5), round((n_new - 1) ** 0.5)
    if n_old == n_new or d_old != d_new or g_old**2 != n_old - 1 or g_new**2 != n_new - 1:
        return ()
    import scipy.ndimage

    posemb = np.asarray(found[POSEMB], np.float32)
    grid = posemb[0, 1:].reshape(g_old, g_old, d_old)
    grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
    found[POSEMB] = np.concatenate([posemb[:, :1], grid.reshape(1, g_new * g_new, d_old)], axis=1)
    return (POSEMB,)


def _kind(path: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"model.pretrained: {path} does not exist.")
    if path.endswith(".npz"):
        return "npz"
    if path.endswith(".safetensors"):
        return "safetensors"
    raise ValueError(
        f"model.pretrained: {path} is neither a .npz (vision_transformer, big_vision) nor a "
        ".safetensors (timm) file."
    )


def _npz_layout(names: list[str]) -> str:
    vision_transformer = any(
        n.startswith(("Transformer/posembed_input", "opt/target/")) for n in names
    )
    return "vision_transformer" if vision_transformer else "big_vision"


def _timm_normalisation(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`pretrained_cfg` mean and std of the `config.json` beside a timm file, else ImageNet's."""
    config_file = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            cfg = json.load(f).get("pretrained_cfg", {})
        if "mean" in cfg and "std" in cfg:
            return tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))
    return IMAGENET_MEAN, IMAGENET_STD


def _from_npz(arrays: dict[str, np.ndarray]) -> tuple[dict, dict, tuple[str, ...]]:
    """(arrays under ViT's names, {name: the file's name}, the file's names left out)."""
    prefix = next((p for p in NPZ_PREFIXES if f"{p}embedding/kernel" in arrays), "")
    found, sources, dropped = {}, {}, []
    for name, array in arrays.items():
        key = name[len(prefix) :] if name.startswith(prefix) else None
        if key is None or key.split("/")[0] in CLASSIFIER:
            dropped.append(name)
            continue
        for k, a in _unstacked(key, array):
            k = _pre_linen(k)
            found[k], sources[k] = a, name
    for old in ("pos_embedding", "Transformer/pos_embedding"):  # big_vision's places
        if old in found:
            found[POSEMB], sources[POSEMB] = _with_cls_row(found.pop(old)), sources.pop(old)
    return found, sources, tuple(sorted(dropped))


def _unstacked(key: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """A scanned encoder's stacked block parameter as one per block."""
    if not key.startswith("Transformer/encoderblock/"):
        return [(key, array)]
    rest = key[len("Transformer/encoderblock/") :]
    return [(f"Transformer/encoderblock_{i}/{rest}", array[i]) for i in range(array.shape[0])]


def _pre_linen(key: str) -> str:
    parts = key.split("/")
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
        parts[2] = LINEN_NAMES.get(parts[2], parts[2])
    return "/".join(parts)


def _with_cls_row(posemb: np.ndarray) -> np.ndarray:
    """big_vision's position embeddings (added before [CLS] is put in front) with a zero row for
    [CLS], unless they have one already (a square grid plus one)."""
    n = posemb.shape[1]
    if round(n**0.5) ** 2 != n:
        return posemb
    return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)


def _from_timm(tensors: dict[str, np.ndarray], heads: int) -> tuple[dict, dict, tuple[str, ...]]:
    """(arrays under ViT's names, {name: timm's name}, timm's names left out)."""
    found, sources, dropped = {}, {}, []
    for name, array in tensors.items():
        if name.split(".")[0] == "head":
            dropped.append(name)
            continue
        for key, value in _timm_rule(name, heads)(array).items():
            found[key], sources[key] = value, name
    return found, sources, tuple(sorted(dropped))


TIMM_TOP = {  # timm name -> (ViT name, array transform)
    "cls_token": ("cls", None),
    "pos_embed": (POSEMB, None),
    "patch_embed.proj.weight": ("embedding/kernel", lambda w: w.transpose(2, 3, 1, 0)),
    "patch_embed.proj.bias": ("embedding/bias", None),
    "norm.weight": ("Transformer/encoder_norm/scale", None),
    "norm.bias": ("Transformer/encoder_norm/bias", None),
}
TIMM_BLOCK = {  # within blocks.N: timm name -> (ViT name under encoderblock_N, transform)
    "norm1.weight": ("LayerNorm_0/scale", None),
    "norm1.bias": ("LayerNorm_0/bias", None),
    "norm2.weight": ("LayerNorm_2/scale", None),
    "norm2.bias": ("LayerNorm_2/bias", None),
    "attn.proj.bias": ("MultiHeadDotProductAttention_1/out/bias", None),
    "mlp.fc1.weight": ("MlpBlock_3/Dense_0/kernel", np.transpose),
    "mlp.fc1.bias": ("MlpBlock_3/Dense_0/bias", None),
    "mlp.fc2.weight": ("MlpBlock_3/Dense_1/kernel", np.transpose),
    "mlp.fc2.bias": ("MlpBlock_3/Dense_1/bias", None),
}


def _timm_rule(name: str, heads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """The function from timm's array `name` to ViT's arrays (unknown names kept as they are)."""
    single = lambda key, fn: lambda a: {key: a if fn is None else fn(a)}  # noqa: E731
    if name in TIMM_TOP:
        return single(*TIMM_TOP[name])
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if not match:
        return single(name, None)
    block, rest = f"Transformer/encoderblock_{match.group(1)}/", match.group(2)
    attention = block + "MultiHeadDotProductAttention_1/"
    if rest in TIMM_BLOCK:
        key, fn = TIMM_BLOCK[rest]
        return single(block + key, fn)
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rpartition(".")[2]
        return lambda a: {
            f"{attention}{part}/{'kernel' if kind == 'weight' else 'bias'}": x
            for part, x in zip(("query", "key", "value"), _split_qkv(a, heads), strict=True)
        }
    if rest == "attn.proj.weight":
        return single(attention + "out/kernel", lambda w: _proj_kernel(w, heads))
    return single(name, None)


def _heads_of(width: int, heads: int) -> int:
    """`heads`, or 1 when the checkpoint's width does not split into them (reported as a shape
    mismatch rather than a reshape error)."""
    return heads if heads > 0 and width % heads == 0 else 1


def _split_qkv(a: np.ndarray, heads: int) -> list[np.ndarray]:
    """timm's qkv weight (3 D, D) or bias (3 D,) as query, key, value kernels (D, H, D / H) or
    biases (H, D / H)."""
    width = a.shape[0] // 3
    h = _heads_of(width, heads)
    parts = a.reshape(3, h, width // h, *a.shape[1:])
    return [p.transpose(2, 0, 1) if a.ndim == 2 else p for p in parts]


def _proj_kernel(w: np.ndarray, heads: int) -> np.ndarray:
    """timm's attention output weight (D, D) as flax's out kernel (H, D / H, D)."""
    h = _heads_of(w.shape[1], heads)
    return w.T.reshape(h, w.shape[1] // h, w.shape[0])


def _heads(want: dict[str, Any]) -> int:
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    return int(want[key].shape[1]) if key in want else 0


def _dims(flat: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(width, depth, heads, MLP width, patch) of a flat params dict; 0 where it does not say."""
    shape = lambda key: tuple(np.shape(flat[key])) if key in flat else ()  # noqa: E731
    embedding = shape("embedding/kernel")
    blocks = {
        int(m.group(1)) for k in flat if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))
    }
    block = "Transformer/encoderblock_0/"
    query = shape(block + "MultiHeadDotProductAttention_1/query/kernel")
    mlp = shape(block + "MlpBlock_3/Dense_0/kernel")
    return (
        embedding[-1] if embedding else 0,
        len(blocks),
        query[1] if len(query) == 3 else 0,
        mlp[-1] if mlp else 0,
        embedding[0] if embedding else 0,
    )


def _preset(width: int, depth: int, heads: int, mlp: int) -> str:
    return next((n for n, dims in SIZES.items() if dims == (width, depth, heads, mlp)), "")
