"""Compile-once phases (`config.head.capacity`): a head with a column for every class from the start.

By default the head widens every phase (`surgery.widen_head`) and the train and eval steps compile
again for the new shapes. With `head.capacity = C` (at least the protocol's number of classes) the
head has C columns throughout, and one train program and one eval program serve every phase:

- phase 0 starts from the widening path's initial variables with zero columns appended; each later
  phase writes into its new classes' columns what `widen_head` gives them on the widening path (the
  same key and `head.init`), so both paths start every phase from the same numbers;
- the logits of classes not seen yet are -inf in training and evaluation (`models.mask_unseen`):
  their columns get no gradient, and weight decay of a zero weight is zero, so they stay zero until
  their phase begins;
- the train epoch takes the whole training set, once, and each phase as `train.PhaseArgs` (the rows
  it trains on, the class counts), or in a streamed run (`dataset.stream`) the phase's host stream
  and the same `PhaseArgs`; the learning rate and weight decay are numbers in the optimizer
  state that the step sets (`train.phase_hyperparams`) from the phase's settings, which are inputs
  too (`train.phase_arrays`: runs that differ only in them share the program), and the epoch order
  for a traced number of examples is the widening path's (`device.batch_indices`);
- evaluation scores the whole test set, a fixed shape, and keeps the seen classes' examples.

A method opts in with `Method.dynamic_phase` (every method but the growth methods der, memo and
foster, whose backbone changes shape every phase): its jitted hooks must work with a `PhaseInfo`
of traced counts and with masked logits for every class, and per-class state it passes them (bias
layers, weight scales, class means) has a row per head column. One program is built per distinct
`PhaseSetup` (freeze_backbone has two: phase 0's and the rest's) and per method-state structure (a
teacher appears after phase 0: distillation methods have two); frozen old columns
(`PhaseSetup.freeze_old_columns`: lucir, new_head_only) are a count the step sets in the optimizer
(`train.NUM_FROZEN`).

The numbers are the widening path's bit for bit on CPU for heads of up to `models.HEAD_BLOCK`
columns: the head's logits and bias gradient, and `models.cross_entropy`'s sum, are fixed-shape
reductions over blocks of columns, so the masked columns only add exact zeros.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable
from typing import Any

import jax.numpy as jnp
import numpy as np

from incremental import surgery, train
from incremental.methods import METHODS, Method, PhaseInfo

PyTree = Any


AUTO = -1  # `head.capacity`'s default: the protocol's classes where that is free, else widen


def resolve(config, method: Method, num_classes: int, saved: int | None = None) -> int:
    """The head width a run uses: `head.capacity`, or for `AUTO` the protocol's number of classes
    when the method supports it (`Method.dynamic_phase`), else 0 (widen every phase). The numbers
    are the same either way.

    `saved` is the width a run being resumed was saved with: `AUTO` keeps it when it can serve
    this run, so a run started before `AUTO` resolved the way it does now resumes as it began.
    """
    capacity = config.head.capacity
    if capacity != AUTO:
        return capacity
    if saved == 0 or (saved is not None and saved >= num_classes and method.dynamic_phase):
        return saved
    return num_classes if method.dynamic_phase else 0


def resolved(config, method: Method, num_classes: int, saved: int | None = None):
    """`config` with `head.capacity` resolved (`resolve`): what a run saves and compares on
    resume. A copy when it changes; the caller's config is left as it was."""
    capacity = resolve(config, method, num_classes, saved)
    if capacity == config.head.capacity:
        return config
    config = copy.deepcopy(config)
    config.head.capacity = capacity
    return config


def width(config) -> int:
    """The head width of a resolved config (`resolved`: `run` and the phase stages resolve theirs);
    0, widening, for `AUTO` where no method is at hand to resolve it (`phase.model.phase_model`)."""
    return max(config.head.capacity, 0)


def check(config, method: Method, num_classes: int) -> None:
    """Raises `ValueError` when `config.head.capacity` cannot serve this run."""
    capacity = config.head.capacity
    if capacity < AUTO:
        raise ValueError(
            f"head.capacity must be -1 (auto: the protocol's classes where the method allows), "
            f"0 (widen the head every phase) or at least {num_classes}; got {capacity}."
        )
    if capacity <= 0:
        return
    if capacity < num_classes:
        raise ValueError(
            f"head.capacity={capacity} is smaller than the protocol's {num_classes} classes; set "
            f"it to at least {num_classes}, or to 0 to widen the head every phase."
        )
    if not method.dynamic_phase:
        valid = sorted(name for name, cls in METHODS.items() if cls.dynamic_phase)
        raise ValueError(
            f"Method {method.name!r} does not support head.capacity (its hooks depend on the "
            f"phase's static shapes); methods that do: {', '.join(valid)}. Set head.capacity=0 "
            "to widen the head every phase."
        )


def initial(variables: PyTree, capacity: int) -> PyTree:
    """Phase 0's variables: the widening path's, with zero head columns up to `capacity`."""
    num = variables["params"]["head"]["kernel"].shape[-1]
    params = surgery.widen_head(variables["params"], capacity - num, None, "zeros")
    return {**variables, "params": params}


def add_classes(variables: PyTree, info: PhaseInfo, widen: Callable[[PyTree], PyTree]) -> PyTree:
    """The phase's starting variables: its new classes' columns as `widen` fills a narrow head.

    `widen(narrow_variables) -> variables` is the widening path's step (`run.widen`), given the
    head's first `info.num_old` columns; its new columns are written into the wide head.
    """
    narrow = {**variables, "params": surgery.narrow_head(variables["params"], info.num_old)}
    widened = widen(narrow)
    params = surgery.fill_head(variables["params"], widened["params"])
    return {**widened, "params": params}


def phase_args(
    info: PhaseInfo, rows: np.ndarray, num_slots: int, hparams: train.PhaseHparams
) -> train.PhaseArgs:
    """The phase as `train.PhaseArgs`: its counts, its training rows padded to `num_slots`, and its
    settings `hparams` (`train.phase_arrays`)."""
    if len(rows) > num_slots:
        raise ValueError(
            f"Phase {info.phase} trains on {len(rows)} examples, more than the {num_slots} of the "
            "training set that head.capacity's program holds; set head.capacity=0."
        )
    padded = np.zeros(num_slots, np.int32)
    padded[: len(rows)] = rows
    scalar = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    return train.PhaseArgs(
        scalar(info.phase),
        scalar(info.num_old),
        scalar(info.num_new),
        scalar(len(rows)),
        jnp.asarray(padded),
        hparams,
    )


class Programs:
    """A run's compiled functions and device data, built on first use and reused by later phases."""

    def __init__(self):
        self._built: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]
