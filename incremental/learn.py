"""`learn(workdir, source, out)`: new data for a finished run, trained as the run's next phase.

The new data are any source the project reads (`npz:PATH`, `folder:PATH`, ...). Its classes are
matched to the run's by name (`sources.merge`; a source without names names each class by its id):
a known name brings more examples of that class, a new name a new class, appended after the run's.
`out` becomes an ordinary work directory whose config is the run's with the source added to
`dataset.learned` (so `phase.load.load_data` merges it as one more phase), written as an edit is
(`workdirs._writing`): the run's phase checkpoints, re-evaluated on the union of the test sets, under
the new config and data fingerprint (each phase's record keeps the fingerprint it trained on),
`config.py`, and the edit in `surgery.json`. Then `run.run` resumes it and trains the new phase
with the run's method, memory and config: on every example the source brings, plus what the method
adds (an exemplar memory). The same `learn` call, or `incremental run --config=OUT/config.py
--workdir=OUT`, resumes it after an interruption.

A head with a column for every class (`head.capacity`) keeps its width where it has room for the new
classes, and is widened with zero columns (`surgery.widen_head`, which keeps every logit
bit-identical) where it has not; the optimizer and method states shaped like it are widened alike.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from incremental import capacity, lock, schema, surgery, workdirs
from incremental import config as config_lib
from incremental import run as run_lib
from incremental.phase import load, save
from incremental.workdirs import RunSetup, Saved

OPERATION = "learn"
# Keys an override cannot change: they define the data, the protocol and the shapes of the copied
# phases (the head's width follows the classes).
FIXED = ("method", "model", "dataset", "protocol", "seed", "seeds", "head.capacity", "dtype")
# The value of a class not begun yet in the per-class rows of the method state
# (`workdirs.PER_CLASS_ROWS`): BiC's bias layers and WA's scales are the identity, 1; the rest 0.
ROW_FILL = {"bias/alpha": 1.0, "scale": 1.0}
COLUMNS = ("weight",)  # analytic's ridge head: (expansion, classes)


class Plan(NamedTuple):
    """What `learn` copies and trains: the run as saved and as it is to go on."""

    old: RunSetup
    new: RunSetup
    phases: list[int]
    widen: int  # zero head columns added to every copied phase (a `head.capacity` head)
    record: dict  # the edit, for surgery.json


def learn(
    workdir: str, source_name: str, out: str, overrides: Mapping[str, Any] | None = None
) -> dict:
    """Trains the data of `source_name` as one more phase of the finished run in `workdir`.

    Args:
      workdir: a complete work directory (every phase of its protocol saved); it is not modified.
      source_name: the new data (`npz:PATH`, `folder:PATH`, ... as `dataset.name`).
      out: the new work directory; it must not exist or be empty, unless it holds this same
        learn (of `workdir` and `source_name`) stopped before its end, which is then resumed.
      overrides: config keys to change for the new phase, `{'train.epochs': 5}` (a text value is
        read as the key's type); the keys of `FIXED` cannot change.

    Returns:
      The results document of `out` (as `run.run` returns it).

    Raises:
      ValueError: an incomplete or busy run, an existing `out`, a source with no examples or with
        examples of another shape, a method that cannot train the phase, a bad override.
      run.Preempted: after SIGTERM/SIGINT in the new phase, once saved; call again to resume.
    """
    overrides = dict(overrides or {})
    if _same_learn(workdir, source_name, out):  # stopped before its end: go on
        config = with_overrides(
            workdirs.config_from_dict(
                config_lib.with_defaults(workdirs.load_config(out).to_dict())
            ),
            overrides,
        )
        return run_lib.run(config, out)
    workdirs._check_out(workdir, out)
    workdirs.saved_phases(workdir)  # a work directory, before its lock file is touched
    with lock.hold(workdir):  # no run writes it while it is read
        plan = prepare(workdir, source_name, out, overrides)
        write(plan, workdir, out)
    return run_lib.run(plan.new.config, out)


def prepare(workdir: str, source_name: str, out: str, overrides: dict) -> Plan:
    """Checks everything that can be checked before anything is written; the plan of the copy."""
    phases = workdirs.saved_phases(workdir)
    with workdirs._checkpoints(workdir) as ckpts:
        meta = ckpts.read_meta(phases[-1])
    old = workdirs.setup(workdirs.config_from_dict(meta["config"]))
    if phases != list(range(old.protocol.num_phases)):
        raise ValueError(
            f"{workdir} is not complete: its protocol has {old.protocol.num_phases} phases and it "
            f"has saved phases {phases}. Finish it first (the `incremental run` command that made "
            "it resumes it), then learn."
        )
    save.check_data(meta.get("data_fingerprint"), old.data.fingerprint, workdir, False)
    config = workdirs.config_from_dict(config_lib.with_defaults(old.config.to_dict()))
    config.dataset.learned = (*config.dataset.learned, source_name)
    config = with_overrides(config, overrides)
    width = capacity.resolve(old.config, old.method, old.protocol.num_classes)
    config.head.capacity = 0  # the width is set once the classes are known
    data, protocol, method = load.validate(config, out)
    # A head with a column for every class keeps its width where the new classes fit, else it
    # widens to them; a head that widens every phase goes on doing so.
    config.head.capacity = max(width, protocol.num_classes) if width else 0
    capacity.check(config, method, protocol.num_classes)
    new = RunSetup(config, method, data, protocol)
    widen = capacity.width(config) - width if width else 0
    return Plan(old, new, phases, widen, edit_record(old, new, source_name, overrides))


def write(plan: Plan, workdir: str, out: str) -> None:
    """Writes `out`: the run's phases under the new config, re-evaluated on the merged test data."""
    old_width = capacity.width(plan.new.config) - plan.widen
    with workdirs._checkpoints(workdir) as ckpts, workdirs._writing(workdir, out) as writer:
        records: list[dict] = []
        for phase in plan.phases:
            saved = workdirs._restore(ckpts, plan.old, phase)
            saved = widened(saved, plan.widen, old_width, plan.old.config.method)
            records.append(workdirs._record(saved.meta["records"][phase], plan.new, phase, saved))
            writer.save(plan.new, phase, saved, list(records))
        writer.finish(plan.new, records, workdirs._history(workdir, plan.record))


def edit_record(old: RunSetup, new: RunSetup, source_name: str, overrides: dict) -> dict:
    """The learn as surgery.json lists it: the source, the phase, its new and known classes."""
    phase = old.protocol.num_phases
    order, num_old = new.protocol.class_order, old.protocol.num_classes
    brought = new.data.y_train[new.data.arrival == phase]
    known = sorted(int(order[p]) for p in np.unique(brought) if p < num_old)
    return {
        "operation": OPERATION,
        "data": source_name,
        "phase": phase,
        "new_classes": [new.protocol.name(c) for c in order[num_old:]],
        "known_classes": [new.protocol.name(c) for c in known],
        "num_train_examples": int(len(brought)),
        "head_capacity": new.config.head.capacity,
        "overrides": {k: str(v) for k, v in overrides.items()},
    }


def _same_learn(workdir: str, source_name: str, out: str) -> bool:
    """Whether `out` holds a learn of `workdir` and `source_name` (written, perhaps unfinished)."""
    history = workdirs._read_json(os.path.join(out, workdirs.SURGERY_FILE), [])
    last = history[-1] if history else {}
    return (
        last.get("operation") == OPERATION
        and last.get("source") == os.path.abspath(workdir)
        and last.get("data") == source_name
    )


# The config.


def with_overrides(config, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config` with `overrides` (`{dotted key: value}`) set; text is read as the key's type."""
    for key, value in overrides.items():
        if any(key == f or key.startswith(f"{f}.") for f in FIXED):
            raise ValueError(
                f"config.{key} cannot change when learning: the run's phases were trained with it "
                f"(the keys under {', '.join(FIXED)} stay the run's). Training keys (train.*, "
                "method_args.*, memory.*, eval.*, log.*, checkpoint.*) can."
            )
        if problem := schema.check_override(key):
            raise ValueError(problem)
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            node = node.get(name) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(f"config.{key} is not a key of the run's config.")
        try:
            node[leaf] = parse_value(key, value, node[leaf])
        except TypeError as error:
            raise ValueError(f"config.{key}: {error}") from None
    return config


def parse_value(key: str, value: Any, current: Any) -> Any:
    """`value` as the type of `key` (the schema's, or `current`'s for a free-form key) if text."""
    spec = schema.KEYS.get(key)
    kind = spec.kind if spec is not None else type(current)
    if not isinstance(value, str) or kind is str:
        return value
    if problem := schema.check_override_value(key, value, kind):
        raise ValueError(problem)
    if kind is bool:
        return value.lower() in ("true", "1")
    if kind in (int, float):
        return kind(value)
    if kind is tuple:
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = tuple(v.strip() for v in value.split(",") if v.strip())
        return tuple(parsed) if isinstance(parsed, tuple | list) else (parsed,)
    return value


# Widening a saved head.


def widened(saved: Saved, num: int, width: int, method: str) -> Saved:
    """`saved` with `num` zero head columns after its `width` (logits unchanged: `widen_head`), and
    its optimizer and method states widened alike."""
    if not num:
        return saved
    state = dict(saved.state)
    state["params"] = surgery.widen_head(state["params"], num, None, "zeros")
    state["opt_state"] = surgery.widen_like(state["opt_state"], num)
    method_state = widen_method_state(saved.method_state, num, width, method)
    return saved._replace(state=state, method_state=method_state)


def widen_method_state(method_state: dict, num: int, width: int, method: str = "this") -> dict:
    """The method state of a head of `width` columns for one of `width + num`.

    Exemplar sets stay; trees shaped like the params (a teacher, importances) and heads kept on
    their own get zero columns; per-class rows (`workdirs.PER_CLASS_ROWS`) and analytic's head get
    rows or columns of a class not begun yet (`ROW_FILL`). Any other leaf with an axis of `width`
    raises `ValueError`: its meaning is unknown, so it cannot be widened safely.
    """
    out = {}
    for key, value in method_state.items():
        if key in workdirs.EXEMPLAR_SETS:
            out[key] = value
        elif workdirs._has_head(value):
            out[key] = surgery.widen_like(value, num)
        elif key.endswith("head") and workdirs._has_head({"head": value}):
            out[key] = surgery.widen_like({"head": value}, num)["head"]
        else:
            widen = lambda path, leaf, key=key: _widen_leaf(key, path, leaf, num, width, method)
            out[key] = jax.tree_util.tree_map_with_path(widen, value)
    return out


def _widen_leaf(key: str, path, leaf, num: int, width: int, method: str):
    name = surgery.path_str(path)
    name = f"{key}/{name}" if name else key
    shape = tuple(np.shape(leaf))
    if name in workdirs.PER_CLASS_ROWS and shape[:1] == (width,):
        pad = [(0, num)] + [(0, 0)] * (len(shape) - 1)
        return jnp.pad(leaf, pad, constant_values=ROW_FILL.get(name, 0.0))
    if name in COLUMNS and shape[-1:] == (width,):
        return jnp.pad(leaf, [(0, 0)] * (len(shape) - 1) + [(0, num)])
    if width in shape:
        raise ValueError(
            f"Cannot widen the {method} method state for the new classes: {name!r} has shape "
            f"{shape}, with an axis of the head's {width} columns, and its meaning is not known "
            "here. Run the method with a head that has room for the classes to come "
            "(--config.head.capacity=N)."
        )
    return leaf
