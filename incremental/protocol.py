"""The class-incremental protocol: a class order and a phase schedule, in plain numpy.

Labels are remapped to positions in the class order, so phase `p` always owns the contiguous label range
`[offsets[p], offsets[p + 1])` and the head's columns grow in that order.

The scenario (`config.protocol.scenario`; van de Ven, Tuytelaars & Tolias 2022, "Three types of
incremental learning") says what a phase brings. `class` and `task` share this schedule: in `task` the
phase's label range is its head block, and the task label (the phase) picks it in training and at
test. In `domain` phase 0 brings every class and each later phase none (sizes `(C, 0, 0, ...)`): the
head never grows, and a phase's examples are the domain it brings (`incremental.data.domains`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

ICARL_SEED = 1993  # the class-order seed of iCaRL, PyCIL and FACIL
SCENARIOS = ("class", "task", "domain")


def scenario_of(config) -> str:
    """`config.protocol.scenario`; 'class' for a config saved before scenarios existed."""
    return config.protocol.get("scenario", "class")


class Protocol(NamedTuple):
    """A class order and the number of new classes in each phase."""

    class_order: tuple[int, ...]  # original class ids, in the order they are learned
    phase_sizes: tuple[int, ...]
    # The name of each class id (class_names[class_order[p]] is position p's), where the data
    # names its classes (image folders, an npz's `class_names`); None: the ids are the names.
    class_names: tuple[str, ...] | None = None

    def name(self, class_id: int) -> str:
        """Class `class_id`'s name, or the id as text when the data has no names."""
        return str(class_id) if self.class_names is None else self.class_names[class_id]

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def num_phases(self) -> int:
        return len(self.phase_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Cumulative class counts: phase p owns labels [offsets[p], offsets[p + 1])."""
        return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.phase_sizes)]))

    def num_seen(self, phase: int) -> int:
        """Number of classes learned up to and including `phase`."""
        return self.offsets[phase + 1]

    def phase_labels(self, phase: int) -> np.ndarray:
        """Remapped labels of the classes that `phase` introduces."""
        return np.arange(self.offsets[phase], self.offsets[phase + 1])

    def phase_of(self, labels: np.ndarray) -> np.ndarray:
        """The phase that introduces each remapped label."""
        return np.searchsorted(np.asarray(self.offsets[1:]), labels, side="right")

    def remap(self, y: np.ndarray) -> np.ndarray:
        """Original class ids -> positions in the class order."""
        lookup = np.empty(self.num_classes, dtype=np.int32)
        lookup[np.asarray(self.class_order)] = np.arange(self.num_classes, dtype=np.int32)
        return lookup[y]


def make_class_order(num_classes: int, order: str | Sequence[int], seed: int = ICARL_SEED):
    """Returns the class order: `"seeded"` (numpy permutation from `seed`), `"natural"` or explicit.

    An explicit order is a sequence of ids or a comma-separated string ("3,1,0,2").
    """
    if isinstance(order, str) and order in ("seeded", "natural"):
        if order == "natural":
            return tuple(range(num_classes))
        # The iCaRL/PyCIL recipe: np.random.seed(1993); np.random.permutation(num_classes).
        return tuple(int(c) for c in np.random.RandomState(seed).permutation(num_classes))
    ids = _parse_ints(order, "protocol.class_order")
    unknown = sorted({c for c in ids if not 0 <= c < num_classes})
    if unknown:
        raise ValueError(
            f"protocol.class_order names class ids {unknown} but the dataset has classes "
            f"0..{num_classes - 1}; use ids in that range, or 'seeded' / 'natural'."
        )
    if len(set(ids)) != len(ids) or len(ids) != num_classes:
        missing = sorted(set(range(num_classes)) - set(ids))
        raise ValueError(
            f"protocol.class_order must list each of the {num_classes} classes exactly once; got "
            f"{len(ids)} ids ({len(ids) - len(set(ids))} repeated, missing {missing})."
        )
    return tuple(ids)


def make_phase_sizes(
    num_classes: int, init_classes: int, increment: int, phase_sizes: str | Sequence[int] = ""
) -> tuple[int, ...]:
    """Returns the phase sizes: explicit `phase_sizes`, or `init_classes` then `increment` per phase.

    `init_classes=0` means the first phase has `increment` classes too (the B0 protocols).
    """
    if phase_sizes not in ("", None, ()):
        sizes = _parse_ints(phase_sizes, "protocol.phase_sizes")
    else:
        if increment <= 0:
            raise ValueError(f"protocol.increment must be positive, got {increment}.")
        if not 0 <= init_classes <= num_classes:
            raise ValueError(
                f"protocol.init_classes={init_classes} is outside 0..{num_classes} "
                f"(the dataset has {num_classes} classes)."
            )
        first = init_classes or increment
        rest = num_classes - first
        if rest % increment:
            raise ValueError(
                f"protocol: after {first} initial classes, the remaining {rest} classes do not "
                f"split into phases of increment={increment}; pick an increment that divides {rest} "
                "or give protocol.phase_sizes explicitly."
            )
        sizes = [first] + [increment] * (rest // increment)
    _check_sizes(sizes, num_classes)
    return tuple(sizes)


def _check_sizes(sizes: list[int], num_classes: int) -> None:
    if len(sizes) > num_classes:
        raise ValueError(
            f"protocol asks for {len(sizes)} phases but the dataset has only {num_classes} classes."
        )
    if any(s <= 0 for s in sizes):
        raise ValueError(f"protocol.phase_sizes {sizes} has an empty or negative phase.")
    if sum(sizes) != num_classes:
        raise ValueError(
            f"protocol.phase_sizes {sizes} sum to {sum(sizes)}, but the dataset has {num_classes} "
            "classes; the phases must cover every class exactly once."
        )


def _parse_ints(value: str | Sequence[int], name: str) -> list[int]:
    if isinstance(value, str):
        try:
            return [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(
                f"{name}={value!r} is not a comma-separated list of integers."
            ) from None
    if not all(isinstance(v, int | np.integer) for v in value):
        raise ValueError(f"{name}={value!r} must contain integers only.")
    return [int(v) for v in value]


def make_protocol(num_classes: int, cfg) -> Protocol:
    """Builds the protocol from `config.protocol` for a dataset with `num_classes` classes."""
    order = make_class_order(num_classes, cfg.class_order, cfg.class_order_seed)
    if cfg.get("scenario", "class") == "domain":  # every class in phase 0, none after it
        return Protocol(order, (num_classes,) + (0,) * (cfg.num_domains - 1))
    sizes = make_phase_sizes(num_classes, cfg.init_classes, cfg.increment, cfg.phase_sizes)
    return Protocol(order, sizes)
