"""Method registry: a name -> a `Method` dataclass; `build` fills its fields from `config.method_args`."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
)
from incremental.methods.finetune import Finetune
from incremental.methods.freeze_backbone import FreezeBackbone
from incremental.methods.joint import Joint
from incremental.methods.new_head_only import NewHeadOnly

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Finetune, Joint, FreezeBackbone, NewHeadOnly)
}

__all__ = [
    "METHODS",
    "Batch",
    "Method",
    "Outputs",
    "PhaseContext",
    "PhaseInfo",
    "PhaseSetup",
    "build",
    "default_args",
    "register",
]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator that makes a method available by its `name` (for methods outside this package)."""
    METHODS[cls.name] = cls
    return cls


def default_args(name: str) -> dict[str, Any]:
    """The hyper-parameters of method `name` with their defaults (the papers' values)."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}.")
    return {
        f.name: f.default
        for f in dataclasses.fields(METHODS[name])
        if f.default is not dataclasses.MISSING
    }


def build(name: str, args: Mapping[str, Any] | None = None) -> Method:
    """Builds the method `name` with hyper-parameters `args` (its dataclass fields)."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}.")
    cls = METHODS[name]
    args = dict(args or {})
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(
            f"Method {name!r} has no hyper-parameter(s) {unknown}; "
            f"its config.method_args are: {sorted(fields) or 'none'}."
        )
    return cls(**args)
