"""Method registry: a name -> a `Method` dataclass; `build` fills its fields from `config.method_args`."""

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from incremental.memory import MemoryConfig
from incremental.methods.agem import AGEM
from incremental.methods.analytic import Analytic
from incremental.methods.aper import Aper
from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
)
from incremental.methods.bic import BiC
from incremental.methods.coda_prompt import CodaPrompt
from incremental.methods.der import DER
from incremental.methods.der_pp import DERpp
from incremental.methods.dualprompt import DualPrompt
from incremental.methods.ease import EASE
from incremental.methods.er_ace import ERACE
from incremental.methods.ewc import EWC, OnlineEWC
from incremental.methods.finetune import Finetune
from incremental.methods.foster import FOSTER
from incremental.methods.freeze_backbone import FreezeBackbone
from incremental.methods.gdumb import GDumb
from incremental.methods.icarl import ICaRL
from incremental.methods.joint import Joint
from incremental.methods.l2p import L2P
from incremental.methods.lucir import LUCIR
from incremental.methods.lwf import LwF
from incremental.methods.mas import MAS
from incremental.methods.memo import MEMO
from incremental.methods.ncm import NCM
from incremental.methods.new_head_only import NewHeadOnly
from incremental.methods.ranpac import RanPAC
from incremental.methods.replay import Replay
from incremental.methods.si import SI
from incremental.methods.simplecil import SimpleCIL
from incremental.methods.wa import WA

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        Finetune,
        Joint,
        FreezeBackbone,
        NewHeadOnly,
        SI,
        NCM,
        Analytic,
        LwF,
        EWC,
        OnlineEWC,
        MAS,
        Replay,
        BiC,
        WA,
        ICaRL,
        LUCIR,
        DER,
        MEMO,
        FOSTER,
        DERpp,
        ERACE,
        AGEM,
        GDumb,
        SimpleCIL,
        RanPAC,
        L2P,
        DualPrompt,
        CodaPrompt,
        Aper,
        EASE,
    )
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
    "default_memory",
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
        if f.default is not dataclasses.MISSING and f.name != "memory"  # set by config.memory
    }


def default_memory(name: str) -> MemoryConfig | None:
    """The default memory of method `name` (None for methods without one): the stream-memory
    methods' defaults name their selection rule."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}.")
    field = {f.name: f for f in dataclasses.fields(METHODS[name])}.get("memory")
    return None if field is None else field.default


def build(
    name: str, args: Mapping[str, Any] | None = None, memory: Mapping[str, Any] | None = None
) -> Method:
    """Builds the method `name` with hyper-parameters `args` (its dataclass fields).

    `memory` (`config.memory`) configures the exemplar memory of methods that keep one.
    """
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
    hints = typing.get_type_hints(cls)
    for key, value in args.items():
        if not _is_a(value, hints[key]):
            kind = getattr(hints[key], "__name__", str(hints[key]))
            raise ValueError(
                f"config.method_args.{key} must be {kind} for method {name!r}, got {value!r}."
            )
    if "memory" in fields and memory is not None:
        args["memory"] = MemoryConfig(**dict(memory))
    return cls(**args)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether a config value suits a method field's annotation (an int where a float goes too)."""
    if isinstance(hint, types.UnionType):
        return any(_is_a(value, h) for h in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        (item, _) = typing.get_args(hint)
        return isinstance(value, (tuple, list)) and all(_is_a(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)
