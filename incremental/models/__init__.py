"""Model registry: backbones by name, wrapped in a Classifier with a linear head."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from incremental.models.branches import Branches
from incremental.models.classifier import (
    HEAD_BLOCK,
    HEADS,
    Classifier,
    CosineHead,
    Head,
    columns_below,
    cosine_logits,
    cross_entropy,
    head_logits,
    log_softmax,
    mask_old,
    mask_other_phases,
    mask_unseen,
    soft_cross_entropy,
    sum_classes,
    unit,
)
from incremental.models.convnet import ConvNet
from incremental.models.layers import PARTS
from incremental.models.mlp import MLP
from incremental.models.resnet import BasicBlock, CifarResNet, ResNet18
from incremental.models.vit import ViT

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "convnet": ConvNet,
    "resnet32": CifarResNet,
    "resnet18": ResNet18,
    "vit": ViT,  # ViT-Ti/S/B (model.kwargs.size); loads checkpoints (models/vit_weights.py)
}

__all__ = [
    "HEAD_BLOCK",
    "MODELS",
    "BasicBlock",
    "Branches",
    "CifarResNet",
    "Classifier",
    "ConvNet",
    "Head",
    "CosineHead",
    "HEADS",
    "classifier",
    "columns_below",
    "cosine_logits",
    "cross_entropy",
    "MLP",
    "PARTS",
    "ResNet18",
    "ViT",
    "backbone_fields",
    "build_backbone",
    "build_model",
    "head_logits",
    "log_softmax",
    "mask_old",
    "mask_other_phases",
    "mask_unseen",
    "soft_cross_entropy",
    "sum_classes",
    "unit",
]


def backbone_fields(name: str) -> tuple[str, ...]:
    """Returns the keyword arguments that the backbone registered as `name` accepts."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid names are {sorted(MODELS)}.")
    fields = dataclasses.fields(MODELS[name])
    return tuple(f.name for f in fields if f.init and f.name not in ("parent", "name"))


def _normalise(key: str, value: Any) -> Any:
    """Makes config values hashable module fields: lists to tuples, dtype names to dtypes."""
    if isinstance(value, list):
        return tuple(value)
    if key == "dtype" and isinstance(value, str):
        return jnp.dtype(value).type
    return value


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """Builds `MODELS[name](**kwargs)`, checking the field names (see `backbone_fields`)."""
    valid = backbone_fields(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown} for model {name!r}; valid fields are {list(valid)}."
        )
    return MODELS[name](**{k: _normalise(k, v) for k, v in kwargs.items()})


def build_model(name: str, num_classes: int, head: str = "linear", **kwargs: Any) -> Classifier:
    """Builds `Classifier(backbone=MODELS[name](**kwargs), num_classes=num_classes)`.

    Args:
      name: a key of MODELS ('mlp', 'convnet', 'resnet32', 'resnet18', 'vit').
      num_classes: width of the head.
      head: 'linear' (nn.Dense's params) or 'cosine' (LUCIR's cosine-normalised head, learnable scale).
      **kwargs: backbone fields, e.g. hidden=(64,), depth=32, small_input=True, dtype='bfloat16'.

    Returns:
      An unbound Classifier; call `init`/`apply` with `train=...`.
    """
    return classifier(build_backbone(name, **kwargs), num_classes, head)


def classifier(backbone: nn.Module, num_classes: int, head: str = "linear") -> Classifier:
    """`Classifier(backbone, num_classes, head)`, checking the width and the head's name."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if head not in HEADS:
        raise ValueError(f"Unknown head {head!r}; valid heads are {sorted(HEADS)}.")
    return Classifier(backbone=backbone, num_classes=num_classes, head_type=head)
