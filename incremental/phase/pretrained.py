"""Phase 0 from a classifier you already have (`model.init_from=PATH`).

The file holds the configured model's variables, trained on the protocol's phase-0 classes:

- `PATH` ending in `.msgpack`: `flax.serialization.to_bytes({"params": ..., "batch_stats": ...})`
  (or of the params alone, for a model without BatchNorm);
- otherwise an orbax checkpoint directory written with
  `orbax.checkpoint.StandardCheckpointer().save(PATH, {"params": ..., "batch_stats": ...})`.

Its tree is the one `incremental.models.build_model(name, num_classes, **kwargs)` gives
(`{"backbone": ..., "head": {"kernel": (D, K), "bias": (K,)}}` under `params`), with K the phase-0
classes. Beside it, `classes.json` (in the same directory; for a directory, inside it) may list
the name of each head column in order: they must be the protocol's phase-0 classes in its order.
Phase 0 then starts from these variables; with `train_first.epochs=0` it does not train, and its
evaluation is the given model's.

A pre-trained backbone instead (`model.pretrained=PATH`, `model.name=vit`): a ViT checkpoint in
one of the layouts `incremental/models/vit_weights.py` reads (vision_transformer or big_vision
`.npz`, timm `.safetensors`) becomes `params/backbone` at initialisation (`with_backbone`), the head
initialised as usual for the protocol's classes; the inputs are normalised with the constants the
weights were trained with (`normalizer`), not with the data's statistics.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from incremental.data import device, sources
from incremental.models import vit_weights

PyTree = Any
CLASSES_FILE = "classes.json"


def read(path: str) -> dict:
    """The variables in `path` as numpy trees `{"params": ..., "batch_stats": ...}`."""
    if not os.path.exists(path):
        raise ValueError(f"model.init_from: {path} does not exist.")
    if path.endswith(".msgpack"):
        from flax import serialization

        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    else:
        import orbax.checkpoint as ocp

        tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
    if not isinstance(tree, dict):
        raise ValueError(f"model.init_from: {path} holds a {type(tree).__name__}, not a dict.")
    return dict(tree) if "params" in tree else {"params": tree, "batch_stats": {}}


def fit(given: dict, target: dict, path: str) -> dict:
    """`given` with the shapes and dtypes of `target` (the configured phase-0 variables), or a
    ValueError naming the first path that is missing, unexpected or of another shape."""
    out = {}
    for collection in ("params", "batch_stats"):
        want = _flat(target.get(collection, {}))
        have = _flat(given.get(collection) or {})
        for key in sorted(set(want) | set(have)):
            where = f"model.init_from: {path}: {collection}/{key}"
            if key not in have:
                raise ValueError(f"{where} is missing; the configured model has it, shape "
                                 f"{want[key].shape}. {_advice()}")  # fmt: skip
            if key not in want:
                raise ValueError(f"{where} is not in the configured model. {_advice()}")
            if tuple(np.shape(have[key])) != tuple(want[key].shape):
                raise ValueError(f"{where} has shape {tuple(np.shape(have[key]))}, the configured "
                                 f"model's is {tuple(want[key].shape)}. {_advice()}")  # fmt: skip
        treedef = jax.tree.structure(target.get(collection, {}))
        leaves = [jax.numpy.asarray(np.asarray(have[k], want[k].dtype)) for k in want]
        out[collection] = jax.tree.unflatten(treedef, leaves)
    return out


def check_names(path: str, expected: list[str]) -> None:
    """The head's column names in `classes.json` beside `path`, if any, against the protocol's."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    names_file = os.path.join(folder, CLASSES_FILE)
    if not os.path.exists(names_file):
        return
    with open(names_file) as f:
        names = [str(n) for n in json.load(f)]
    if names != expected:
        raise ValueError(
            f"model.init_from: {names_file} names the head's columns {names}, but phase 0 of the "
            f"protocol has the classes {expected} in that order; set protocol.class_order (and "
            "protocol.init_classes) so that phase 0 holds the given model's classes in its order."
        )


def _flat(tree) -> dict[str, Any]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _advice() -> str:
    return (
        "Save the variables of the model the config builds (model.name, model.kwargs, a head of "
        "the phase-0 classes), as incremental/phase/pretrained.py describes."
    )


# The ViT's own subtrees of `params/backbone`; a method's additions beside them (`prompt/...` of
# the prompt methods) are no part of a checkpoint and keep their initialisation.
VIT_PARTS = ("embedding", "cls", "Transformer")


def with_backbone(config, variables: dict) -> dict:
    """`variables` with the ViT of `params/backbone` read from `model.pretrained` (the head, and a
    method's additions to the backbone, as they were)."""
    backbone = variables["params"].get("backbone", {})
    loaded, _ = load_backbone(config, backbone)
    backbone = {**backbone, **jax.tree.map(jax.numpy.asarray, loaded)}
    return {**variables, "params": {**variables["params"], "backbone": backbone}}


def load_backbone(config, target: PyTree) -> tuple[PyTree, vit_weights.Recipe]:
    """The ViT weights at `model.pretrained` shaped like `target` (the backbone's params or their
    shapes), and their recipe; a ValueError when they cannot be this model's backbone."""
    path = config.model.pretrained
    if config.model.name != "vit":
        raise ValueError(
            f"model.pretrained loads ViT weights, but model.name is {config.model.name!r}; set "
            "model.name=vit with the checkpoint's size (model.kwargs.size)."
        )
    if config.model.init_from:
        raise ValueError(
            "model.pretrained and model.init_from are both set; set one: a pre-trained backbone "
            "under a new head, or a whole classifier of the phase-0 classes."
        )
    if "embedding" not in target:
        raise ValueError(
            f"Method {config.method!r} builds its backbone from the config's (its params are "
            f"{sorted(target)}), so model.pretrained cannot be loaded into it; use a method whose "
            "backbone is the configured ViT itself."
        )
    loaded, recipe = vit_weights.load(path, {k: v for k, v in target.items() if k in VIT_PARTS})
    gelu = config.model.kwargs.get("gelu", "tanh")
    if gelu != recipe.gelu:
        raise ValueError(
            f"model.pretrained: {path} ({recipe.layout}) was trained with the {recipe.gelu!r} "
            f"GELU, the model uses {gelu!r}; set model.kwargs.gelu={recipe.gelu!r}."
        )
    return loaded, recipe


def normalizer(
    config, x_train: np.ndarray, is_image: bool, max_value: float | None = None
) -> device.Normalizer:
    """The training inputs' statistics, or with `model.pretrained` the constants its weights were
    trained with (`Recipe.mean`, `.std` of images in [0, 1]), scaled to the stored range: times
    the source's `max_value` (digits: 16), else 255 for uint8 images, 1 for float ones
    (`sources.full_intensity`)."""
    path = config.model.get("pretrained", "")
    if not path:
        return device.fit_normalizer(x_train, is_image)
    if not is_image:
        raise ValueError("model.pretrained needs images (H, W, C); the dataset holds vectors.")
    recipe = vit_weights.recipe(path)
    mean, std = np.asarray(recipe.mean, np.float32), np.asarray(recipe.std, np.float32)
    channels = x_train.shape[-1]
    if channels == 1 and len(mean) != 1:  # gray images: the channels' average
        mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    if channels != len(mean):
        raise ValueError(
            f"model.pretrained: {path} normalises {len(mean)} channels, the images have {channels}."
        )
    scale = np.float32(sources.full_intensity(x_train, max_value))
    return device.Normalizer(
        (mean * scale).reshape(1, 1, 1, -1), (std * scale).reshape(1, 1, 1, -1)
    )
