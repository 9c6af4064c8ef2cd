"""Finished work directories: evaluate a saved phase, remove classes from a run, graft parameters.

A work directory is what `incremental run` writes (see `checkpoint.py` and README, "Where things
go"). These functions read its phase checkpoints and never write to it, except `evaluate`, which
adds `evaluation.json`. An edit writes a new work directory that `incremental run` resumes and
`evaluate` reads like any other:

- `checkpoints/phase/<p>/`, the edited phase ends, written by `checkpoint.Checkpoints`;
- `results.json`, rebuilt from the edited phases, with a `surgery` key listing the edits;
- `surgery.json`, the same list (a resumed run rewrites results.json without it);
- `config.py`, the edited run's config: `incremental run --config=OUT/config.py --workdir=OUT`.

Removing classes renumbers them: the protocol needs ids `0..K-1`, so the edited config keeps the
remaining classes with `dataset.classes` (in increasing id order, so relative order is kept) and
lists the class order and phase sizes explicitly. `surgery.json` maps old ids to new ones.
"""

from __future__ import annotations

import ast
import contextlib
import datetime
import json
import os
import pprint
import shutil
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

from incremental import capacity, checkpoint, lock, methods, surgery, train
from incremental.data import sources
from incremental.evaluate import task_aware_predictions
from incremental.methods import Method, PhaseInfo
from incremental.phase.evaluate import evaluate_phase, learned_test
from incremental.phase.load import RunData, load_data, source_options
from incremental.phase.model import dtype_of, phase_model
from incremental.phase.record import results_from_records, write_results
from incremental.phase.save import check_data, state_target
from incremental.protocol import Protocol, scenario_of

PyTree = Any
EVALUATION_FILE = "evaluation.json"
SURGERY_FILE = "surgery.json"
CONFIG_FILE = "config.py"
# Method-state entries that remove_classes knows how to edit (see `edit_method_state`).
EXEMPLAR_SETS = ("memory", "validation")  # {'indices': into the training set, 'labels': remapped}
PER_CLASS_ROWS = ("class_means", "scale", "bias/alpha", "bias/beta")  # axis 0: the seen classes
ROW_KEYS = (
    "row",
    "task_aware_row",
    "grouped_row",
    "accuracy",
    "task_aware_accuracy",
    "old_accuracy",
    "new_accuracy",
)


class RunSetup(NamedTuple):
    """What a saved config describes: the method, the data after the protocol, the protocol."""

    config: ml_collections.ConfigDict
    method: Method
    data: RunData
    protocol: Protocol


class Saved(NamedTuple):
    """One restored phase checkpoint."""

    phase: int
    state: dict  # params, batch_stats, opt_state, rng
    method_state: dict
    meta: dict


# Reading a work directory.


def config_from_dict(values: dict) -> ml_collections.ConfigDict:
    """A ConfigDict from a config saved as JSON (lists back to the tuples the config files use)."""

    def tuples(value):
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return tuple(tuples(v) for v in value)
        return value

    return ml_collections.ConfigDict(tuples(values))


def saved_phases(workdir: str) -> list[int]:
    """The phases with an end-of-phase checkpoint in `workdir`, in order; raises if there are none."""
    directory = os.path.join(workdir, "checkpoints", "phase")
    if not os.path.isdir(workdir):
        raise ValueError(f"No work directory {workdir}.")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    phases = sorted(int(n) for n in names if n.isdigit())
    if not phases:
        raise ValueError(
            f"{workdir} holds no phase checkpoint (no {directory}/<phase>); pass the --workdir of "
            "a run that has finished at least one phase."
        )
    return phases


@contextlib.contextmanager
def _checkpoints(workdir: str) -> Iterator[checkpoint.Checkpoints]:
    saved_phases(workdir)
    ckpts = checkpoint.Checkpoints(workdir)
    try:
        yield ckpts
    finally:
        ckpts.close()


def load_config(workdir: str, phase: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with the newest (or the given) phase checkpoint of `workdir`."""
    phase = _pick_phase(workdir, phase)
    with _checkpoints(workdir) as ckpts:
        return config_from_dict(ckpts.read_meta(phase)["config"])


def _pick_phase(workdir: str, phase: int | None) -> int:
    phases = saved_phases(workdir)
    if phase is None:
        return phases[-1]
    if phase not in phases:
        raise ValueError(f"{workdir} has no checkpoint of phase {phase}; it has phases {phases}.")
    return phase


def setup(config: ml_collections.ConfigDict) -> RunSetup:
    """The method, data and protocol of `config`, as the run builds them."""
    method = methods.build(config.method, config.method_args, config.memory)
    data, protocol, _ = load_data(config)
    return RunSetup(config, method, data, protocol)


# The two places that build run-shaped things; run.py's signatures may change.
def _model(rs: RunSetup, phase: int):
    """The model that the run evaluates at the end of `phase`."""
    info = PhaseInfo(phase, rs.protocol.offsets[phase], rs.protocol.phase_sizes[phase])
    return phase_model(rs.config, rs.method, info, final=True)


def _state_target(rs: RunSetup, phase: int) -> PyTree:
    return state_target(rs.config, rs.method, rs.protocol, rs.data, phase)


def _restore(ckpts: checkpoint.Checkpoints, rs: RunSetup, phase: int) -> Saved:
    try:
        state, method_state, meta = ckpts.restore(phase, _state_target(rs, phase))
    except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint gets the same message
        raise ValueError(
            f"The checkpoint of phase {phase} in {os.path.dirname(ckpts.directory)} cannot be read "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]})."
        ) from None
    return Saved(phase, dict(state), method_state, meta)


def restore(workdir: str, phase: int | None = None) -> tuple[RunSetup, Saved]:
    """The newest (or the given) phase checkpoint of `workdir`, and the setup of its saved config."""
    phase = _pick_phase(workdir, phase)
    with _checkpoints(workdir) as ckpts:
        meta = ckpts.read_meta(phase)
        rs = setup(config_from_dict(meta["config"]))
        # Numbers of a model on other data than it was trained and saved with are not its own.
        check_data(meta.get("data_fingerprint"), rs.data.fingerprint, workdir, allow_change=False)
        return rs, _restore(ckpts, rs, phase)


# Evaluation.


def _dataset_labels(config, num_classes: int) -> np.ndarray:
    """The label in the dataset of each class id of the protocol (they differ after `dataset.classes`;
    a class brought by `incremental learn` keeps its id)."""
    spec = config.dataset.classes
    if not spec:
        return np.arange(num_classes)
    if spec.startswith("seeded:"):  # a permutation of all the dataset's classes: its size is needed
        total = sources.load_source(config.dataset.name, **source_options(config)).num_classes
    else:
        total = max(int(c) for c in spec.split(",") if c.strip()) + 1
    ids = np.arange(total)
    fake = sources.Source(ids, ids, ids, ids, total, "labels", False)
    kept = sources.subset_classes(fake, spec)  # the run's own rule; x holds the dataset labels
    labels = np.arange(num_classes)
    labels[kept.y_train] = kept.x_train
    return labels


def _scores(rs: RunSetup, model, predict_fn, variables, method_state, x, num_seen) -> np.ndarray:
    dtype = dtype_of(rs.config)
    wide = capacity.width(rs.config) > 0  # a column for every class: mask those not seen yet
    apply = train.make_apply_batches(model, rs.data.norm, predict_fn, dtype, mask=wide)
    extra = (num_seen,) if wide else ()
    return train.run_batched(apply, variables, method_state, x, rs.config.eval.batch_size, *extra)


def evaluate_saved(rs: RunSetup, saved: Saved, *, predictions: bool = False):
    """The phase's results row, from `run.evaluate_phase` as the run computes it.

    With `predictions=True`, returns `(row, predictions)`, where `predictions[name]` holds the
    predicted class positions of the seen classes' test examples, in the domain scenario those of
    the domains learned so far (`learned_test`; `name` is `'head'` or a method's extra classifier
    such as `'nme'`); in the task scenario each among its task's classes, as its headline numbers.
    """
    num_seen = rs.protocol.num_seen(saved.phase)
    model = _model(rs, saved.phase)
    variables = {"params": saved.state["params"], "batch_stats": saved.state["batch_stats"]}
    method_state = saved.method_state
    row = evaluate_phase(
        rs.config, model, rs.method, rs.data, rs.protocol, saved.phase, variables, method_state
    )
    if not predictions:
        return row
    learned = learned_test(rs.data, rs.protocol, saved.phase)
    x = rs.data.x_test[learned]
    fns = {"head": rs.method.predict, **rs.method.extra_predictions()}
    state = methods.base.select_state(method_state, rs.method.eval_keys)
    scores = {
        name: _scores(rs, model, fn, variables, state, x, num_seen) for name, fn in fns.items()
    }
    if scenario_of(rs.config) != "task":
        return row, {name: s.argmax(axis=1) for name, s in scores.items()}
    test_phase = rs.protocol.phase_of(rs.data.y_test[learned])  # the task label, given
    return row, {
        name: task_aware_predictions(s, test_phase, rs.protocol) for name, s in scores.items()
    }


def evaluate(workdir: str, phase: int | None = None, *, predictions: bool = False):
    """Evaluates a saved phase of a work directory and writes `<workdir>/evaluation.json`.

    Args:
      workdir: a work directory with at least one phase checkpoint.
      phase: the phase to evaluate (default: the newest saved).
      predictions: also return the predictions, example by example (see Returns).

    Returns:
      The document: `accuracy`, `task_aware_accuracy`, `old_accuracy`, `new_accuracy`, `row` and
      `task_aware_row` (this phase's rows of the results matrices), `extra` (the method's other
      classifiers, e.g. `nme`, with the same keys), `per_class` (for each seen class in the class
      order: `class` (id as in results.json's `class_order`), `name` (from the data, else the id),
      `dataset_class`, `phase`, `num_test`,
      `accuracy` and `<name>_accuracy` for each extra classifier), `confusion` (test example counts
      per true and predicted class id, `{true: {predicted: n}}`), and what was evaluated.
      `per_class` and `confusion` count the test examples of the domains learned so far in the
      domain scenario.
      With `predictions=True`, `(document, predictions)`: the seen classes' test examples in
      test-set order as dataset labels, `y` (true), `head` and each extra classifier (predicted),
      so that two work directories over the same dataset compare example by example.
    """
    doc, predicted = _evaluate(workdir, phase)
    path = os.path.join(workdir, EVALUATION_FILE)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(path + ".tmp", path)
    except OSError as error:  # a read-only work directory can still be evaluated
        logging.warning("%s not written (%s); the evaluation is only shown.", path, error.strerror)
    return (doc, predicted) if predictions else doc


def _evaluate(workdir: str, phase: int | None) -> tuple[dict, dict]:
    """The evaluation document and the predictions in dataset labels (see `evaluate`)."""
    rs, saved = restore(workdir, phase)
    phase = saved.phase
    row, predictions = evaluate_saved(rs, saved, predictions=True)
    num_seen = rs.protocol.num_seen(phase)
    order = np.asarray(rs.protocol.class_order)
    labels = _dataset_labels(rs.config, rs.protocol.num_classes)
    y = rs.data.y_test[learned_test(rs.data, rs.protocol, phase)]
    per_class = []
    for position in range(num_seen):
        mine = y == position
        entry = {
            "class": int(order[position]),
            "name": rs.protocol.name(int(order[position])),
            "dataset_class": int(labels[order[position]]),
            "phase": int(rs.protocol.phase_of(np.asarray([position]))[0]),
            "num_test": int(mine.sum()),
        }
        for name, pred in predictions.items():
            key = "accuracy" if name == "head" else f"{name}_accuracy"
            entry[key] = float(np.mean(pred[mine] == position)) if mine.any() else None
        per_class.append(entry)
    confusion: dict[str, dict[str, int]] = {}
    for true, pred in zip(order[y], order[predictions["head"]], strict=True):
        counts = confusion.setdefault(str(true), {})
        counts[str(pred)] = counts.get(str(pred), 0) + 1
    history = _read_json(os.path.join(workdir, SURGERY_FILE), [])
    doc = {
        "workdir": os.path.abspath(workdir),
        "phase": phase,
        "num_phases": rs.protocol.num_phases,
        "method": rs.config.method,
        "dataset": rs.config.dataset.name,
        "num_seen": num_seen,
        "class_order": [int(c) for c in order[:num_seen]],
        "num_test": int(len(y)),
        **row,
        "per_class": per_class,
        "confusion": confusion,
        "surgery": history,
    }
    return doc, {
        "y": labels[order[y]],
        **{name: labels[order[pred]] for name, pred in predictions.items()},
    }


def _read_json(path: str, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


# Editing the method state.


def edit_method_state(
    method_state: dict,
    removed: Sequence[int],
    num_seen: int,
    *,
    label_map: np.ndarray,
    index_map: np.ndarray,
    method: str = "this",
) -> dict:
    """The method state without the classes at head positions `removed` (of `num_seen`).

    Known entries are edited: exemplar sets (`memory`, `validation`) lose the exemplars of removed
    classes and are renumbered (`label_map`: old position -> new position or -1; `index_map`: old
    training index -> new one or -1); per-class rows (`class_means`, `scale`, `bias/alpha`,
    `bias/beta`) lose their rows; entries shaped like the params (a teacher, importances), and heads
    kept on their own (a key ending in `head`), lose their head columns. Any other leaf with an axis of `num_seen`
    entries raises `ValueError`: its meaning is unknown, so it cannot be edited safely.
    """
    out = {}
    for key, value in method_state.items():
        if key in EXEMPLAR_SETS and isinstance(value, dict) and set(value) == {"indices", "labels"}:
            out[key] = _edit_exemplars(value, label_map, index_map)
        elif removed and _has_head(value):
            out[key] = surgery.remove_classes_like(value, removed, num_seen)
        elif removed and key.endswith("head") and _has_head({"head": value}):
            # A head kept on its own (FOSTER's `old_head`): its columns are the seen classes.
            out[key] = surgery.remove_classes_like({"head": value}, removed, num_seen)["head"]
        elif removed:
            out[key] = _edit_rows(value, key, removed, num_seen, method)
        else:
            out[key] = value
    return out


def _has_head(tree) -> bool:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return any(surgery.path_str(p).endswith(("head/kernel", "head/bias")) for p, _ in leaves)


def _edit_exemplars(exemplars: dict, label_map: np.ndarray, index_map: np.ndarray) -> dict:
    labels = np.asarray(exemplars["labels"])
    new_labels = label_map[labels]
    keep = new_labels >= 0
    indices = index_map[np.asarray(exemplars["indices"])[keep]]
    if (indices < 0).any():
        raise ValueError("An exemplar of a kept class is not in the edited training set.")
    return {
        "indices": jax.numpy.asarray(indices, np.int32),
        "labels": jax.numpy.asarray(new_labels[keep], labels.dtype),
    }


def _edit_rows(tree, key: str, removed: Sequence[int], num_seen: int, method: str):
    keep = np.setdiff1d(np.arange(num_seen), removed)

    def edit(path, leaf):
        name = surgery.path_str(path)
        name = f"{key}/{name}" if name else key
        shape = tuple(np.shape(leaf))
        if name in PER_CLASS_ROWS:
            if not shape or shape[0] != num_seen:
                raise ValueError(
                    f"The {method} method state's {name!r} has shape {shape}; expected one row "
                    f"per seen class ({num_seen})."
                )
            return jax.numpy.take(leaf, keep, axis=0)
        if num_seen in shape:
            raise ValueError(
                f"Cannot remove classes from the {method} method state: {name!r} has shape "
                f"{shape}, with an axis of the {num_seen} seen classes, and its meaning is not "
                f"known here. Editable: exemplar sets {EXEMPLAR_SETS}, per-class rows "
                f"{PER_CLASS_ROWS} and trees shaped like the params (a teacher, importances)."
            )
        return leaf

    return jax.tree_util.tree_map_with_path(edit, tree)


def _edit_state(state: dict, removed: Sequence[int], num_seen: int) -> dict:
    if not removed:
        return state
    return {
        **state,
        "params": surgery.remove_classes(state["params"], removed),
        "opt_state": surgery.remove_classes_like(state["opt_state"], removed, num_seen),
    }


def _check_fits(state: PyTree, target: PyTree, what: str) -> None:
    """The edited state must restore into the shapes the run expects; say where it does not."""
    specs = lambda tree: {
        surgery.path_str(p): tuple(np.shape(leaf))
        for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    have, want = specs(state), specs(target)
    if have != want:
        diffs = [
            f"{p}: {have.get(p, 'missing')} vs {want.get(p, 'missing')}"
            for p in sorted(set(have) | set(want))
            if have.get(p) != want.get(p)
        ]
        raise ValueError(
            f"{what} does not fit the edited run's state (edited vs expected): "
            + "; ".join(diffs[:6])
        )


# Writing a new work directory.


def _check_out(workdir: str, out: str) -> None:
    source, target = os.path.realpath(workdir), os.path.realpath(out)
    if target == source or target.startswith(source + os.sep):
        raise ValueError(
            f"--out {out} is inside the source work directory {workdir}; pick another."
        )
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} already exists and is not empty; pick a new directory.")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out} cannot be created ({parent} is not a writable directory).")


def _remove_stale(out: str) -> None:
    """Removes the temporary siblings `out.tmp-<pid>` that killed surgeries left behind (their
    process is gone); those of a surgery still running are left alone."""
    prefix = f"{os.path.basename(out.rstrip(os.sep))}.tmp-"
    parent = os.path.dirname(os.path.abspath(out))
    for name in os.listdir(parent):
        pid = name.removeprefix(prefix)
        if name.startswith(prefix) and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


class _Writer:
    """Writes a work directory into a temporary sibling of `out`, renamed to `out` when complete."""

    def __init__(self, out: str):
        self.out = out
        self.tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
        _remove_stale(out)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.ckpts = checkpoint.Checkpoints(self.tmp)

    def save(self, rs: RunSetup, phase: int, saved: Saved, records: list[dict]) -> None:
        _check_fits(saved.state, _state_target(rs, phase), f"The edited phase {phase}")
        meta = {k: v for k, v in saved.meta.items() if k != "empty_method_leaves"}
        meta.update(
            phase=phase,
            steps=None,
            records=records,
            config=rs.config.to_dict(),
            class_order=list(rs.protocol.class_order),
            class_names=None if rs.protocol.class_names is None else list(rs.protocol.class_names),
            data_fingerprint=rs.data.fingerprint,  # the edited run's data (its classes)
        )
        meta = json.loads(json.dumps(meta, default=_json_default))
        self.ckpts.save(phase, saved.state, saved.method_state, meta)

    def finish(self, rs: RunSetup, records: list[dict], history: list[dict]) -> dict:
        self.ckpts.close()
        results = results_from_records(rs.config, rs.protocol, records)
        results["surgery"] = history
        write_results(self.tmp, results)
        with open(os.path.join(self.tmp, SURGERY_FILE), "w") as f:
            json.dump(history, f, indent=1, default=_json_default)
        write_config_file(rs.config, os.path.join(self.tmp, CONFIG_FILE), self.out)
        if rs.config.log.plot:
            from incremental import report

            report.plot(results, os.path.join(self.tmp, "accuracy.png"))
        if os.path.isdir(self.out):
            os.rmdir(self.out)  # empty, checked before
        os.rename(self.tmp, self.out)
        return results

    def abort(self) -> None:
        self.ckpts.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def _writing(workdir: str, out: str) -> Iterator[_Writer]:
    """A `_Writer` of `out`, holding `out`'s lock (a sibling `.NAME.lock`, removed at the end) so
    that two surgeries cannot write one output; a failed or interrupted one leaves nothing."""
    head, name = os.path.split(os.path.abspath(out).rstrip(os.sep))
    advice = "wait for it to end, or pick another --out"
    with lock.hold_file(os.path.join(head, f".{name}.lock"), f"--out {out}", advice, remove=True):
        _check_out(workdir, out)  # again, now that no one else can write it
        writer = _Writer(out)
        try:
            yield writer
        except BaseException:
            writer.abort()
            raise


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_config_file(config: ml_collections.ConfigDict, path: str, workdir: str) -> None:
    """Writes `config` as a config file (`get_config()`) that `incremental run --config=` accepts."""
    values = config.to_dict()
    literal = pprint.pformat(values, width=96, sort_dicts=False)
    if ast.literal_eval(literal) != values:
        raise ValueError("The config holds values that cannot be written as Python literals.")
    with open(path, "w") as f:
        f.write(
            '"""The config of a run edited by `incremental surgery` or `learn` (see surgery.json).\n'
            "Resume it:\n\n"
            f"    incremental run --config={os.path.join(workdir, CONFIG_FILE)} --workdir={workdir}\n"
            '"""\n\nimport ml_collections\n\n'
            f"CONFIG = {literal}\n\n\n"
            "def get_config(arg=None):\n"
            "    del arg\n"
            "    return ml_collections.ConfigDict(CONFIG)\n"
        )


def _history(workdir: str, record: dict) -> list[dict]:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    entry = {**record, "source": os.path.abspath(workdir), "time": stamp}
    return [*_read_json(os.path.join(workdir, SURGERY_FILE), []), entry]


def _record(old: dict, rs: RunSetup, phase: int, saved: Saved) -> dict:
    """A phase's results record after an edit: re-evaluated, with the training facts of the original."""
    row = evaluate_saved(rs, saved._replace(phase=phase))
    protocol = rs.protocol
    lo, hi = protocol.offsets[phase], protocol.offsets[phase + 1]
    record = {k: v for k, v in old.items() if k not in (*ROW_KEYS, "extra")}
    record.update(phase=phase, classes=[int(c) for c in protocol.class_order[lo:hi]], num_seen=hi)
    return {**record, **row}


# Removing classes.


def _removed_positions(protocol: Protocol, classes: Sequence[int], num_seen: int) -> list[int]:
    array = np.asarray(classes).reshape(-1)
    if array.size == 0:
        raise ValueError("No classes to remove were given.")
    if array.dtype.kind not in "iu":
        raise TypeError(f"Classes are integer class ids, got {list(classes)!r}.")
    ids = [int(c) for c in array]
    order = list(protocol.class_order)
    unknown = sorted(c for c in set(ids) if c not in order)
    if unknown:
        raise ValueError(
            f"Unknown class ids {unknown}: the run's classes (results.json's class_order) are "
            f"{sorted(order)}."
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"Classes to remove are repeated: {sorted(ids)}.")
    positions = sorted(order.index(c) for c in ids)
    unseen = [order[p] for p in positions if p >= num_seen]
    if unseen:
        raise ValueError(
            f"Classes {unseen} have not been learned yet (the newest checkpoint has seen "
            f"{order[:num_seen]}); only learned classes can be removed."
        )
    if len(positions) == num_seen:
        raise ValueError(f"Removing all {num_seen} learned classes would leave nothing.")
    return positions


def _config_without(rs: RunSetup, positions: Sequence[int]) -> ml_collections.ConfigDict:
    """The config of the same run without the classes at `positions` (renumbered, see module doc)."""
    order = np.asarray(rs.protocol.class_order)
    removed_ids = set(order[list(positions)].tolist())
    kept_ids = sorted(set(order.tolist()) - removed_ids)
    new_id = {old: new for new, old in enumerate(kept_ids)}
    labels = _dataset_labels(rs.config, rs.protocol.num_classes)
    sizes = [
        size - sum(lo <= p < lo + size for p in positions)
        for lo, size in zip(rs.protocol.offsets, rs.protocol.phase_sizes, strict=False)
    ]
    config = config_from_dict(rs.config.to_dict())
    config.dataset.classes = ",".join(str(int(labels[i])) for i in kept_ids)
    config.protocol.class_order = ",".join(str(new_id[c]) for c in order.tolist() if c in new_id)
    config.protocol.phase_sizes = ",".join(str(s) for s in sizes if s)
    if capacity.width(rs.config):  # the head keeps a column for every class left
        config.head.capacity = capacity.width(rs.config) - len(positions)
    return config


def remove_classes(workdir: str, classes: Sequence[int], out: str) -> dict:
    """Writes to `out` the run of `workdir` without `classes`, as if they had never been in it.

    Every saved phase is edited: the head loses the classes' columns (`surgery.remove_classes`;
    the other classes' logits stay bit-identical), the optimizer state and the method state lose
    their entries (`edit_method_state`), and the phase is evaluated again under the edited
    protocol. A phase left without classes is dropped; the newest checkpoint is always kept. In
    the domain scenario every phase keeps its place (each brings every class left).
    Within-phase checkpoints are not copied: the edited run resumes after its newest phase. A run
    with a column for every class (`head.capacity`) loses the removed classes' columns in every
    phase, learned or not, and keeps a column for every class left.

    Args:
      workdir: the source work directory; it is not modified.
      classes: class ids as in results.json's `class_order`, learned by the newest checkpoint.
      out: the new work directory; it must not exist or be empty.

    Returns:
      The surgery record (also in `out/surgery.json`): the removed classes, the new id of every
      kept class (`class_ids`, old -> new) and which source phase each new phase comes from.

    Raises:
      ValueError: unknown, repeated or unlearned classes, all learned classes, an existing `out`,
        or a method state that cannot be edited.
    """
    _check_out(workdir, out)
    phases = saved_phases(workdir)
    with _checkpoints(workdir) as ckpts:
        old = setup(config_from_dict(ckpts.read_meta(phases[-1])["config"]))
        if old.config.dataset.get("learned"):
            raise ValueError(
                f"{workdir} learned more data (dataset.learned); removing classes from such a run "
                "is not supported yet. Remove them from the run it learned on, then learn again."
            )
        width = capacity.width(old.config)  # a column for every class, or 0: the seen ones
        positions = _removed_positions(old.protocol, classes, old.protocol.num_seen(phases[-1]))
        new = setup(_config_without(old, positions))
        label_map, index_map = _maps(old, positions)
        sources_of = _phase_sources(workdir, phases, old.protocol, new.protocol, label_map)
        records: list[dict] = []
        with _writing(workdir, out) as writer:
            for phase, source in sorted(sources_of.items()):
                saved = _restore(ckpts, old, source)
                num_seen = old.protocol.num_seen(source)
                mine = [p for p in positions if p < num_seen]
                if width:  # every class has a column: those not seen yet go too
                    mine, num_seen = list(positions), width
                method_state = edit_method_state(
                    saved.method_state,
                    mine,
                    num_seen,
                    label_map=label_map,
                    index_map=index_map,
                    method=old.config.method,
                )
                _check_exemplars(method_state, new.data.y_train)
                state = _edit_state(saved.state, mine, num_seen)
                edited = Saved(phase, state, method_state, saved.meta)
                records.append(_record(saved.meta["records"][source], new, phase, edited))
                writer.save(new, phase, edited, list(records))
            record = _removal_record(old, new, positions, label_map, sources_of, phases[-1])
            history = _history(workdir, record)
            writer.finish(new, records, history)
    return history[-1]


def _removal_record(
    old: RunSetup, new: RunSetup, positions, label_map, sources_of: dict, source_phase: int
) -> dict:
    """`remove_classes`' entry of surgery.json: the classes removed, each kept class's new id, the
    source phase of every new phase, and the config keys that changed."""
    order = old.protocol.class_order
    return {
        "operation": "remove_classes",
        "classes": sorted(int(order[p]) for p in positions),
        "source_phase": source_phase,
        "class_ids": {
            str(order[p]): int(new.protocol.class_order[label_map[p]])
            for p in range(len(order))
            if label_map[p] >= 0
        },
        "phases": {str(p): s for p, s in sorted(sources_of.items())},
        "config": {
            "dataset.classes": new.config.dataset.classes,
            "protocol.class_order": new.config.protocol.class_order,
            "protocol.phase_sizes": new.config.protocol.phase_sizes,
        },
    }


def _maps(old: RunSetup, positions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Old class position -> new position, and old training index -> new index (-1: removed)."""
    label_map = np.full(old.protocol.num_classes, -1, np.int64)
    kept = np.setdiff1d(np.arange(old.protocol.num_classes), positions)
    label_map[kept] = np.arange(len(kept))
    # The edited run's training set is the old one without the removed classes, in the same order.
    keep_train = label_map[old.data.y_train] >= 0
    return label_map, np.where(keep_train, np.cumsum(keep_train) - 1, -1)


def _phase_sources(
    workdir: str, phases: list[int], old: Protocol, new: Protocol, label_map: np.ndarray
) -> dict[int, int]:
    """Each edited phase and the source phase it is made from: the newest with its classes left.
    Where every phase after the first brings no classes (the domain scenario: each brings every
    class again), every phase keeps its place."""
    if not any(old.phase_sizes[1:]):
        return {phase: phase for phase in phases}
    sources_of: dict[int, int] = {}
    for phase in phases:
        num_seen = int(label_map[: old.num_seen(phase)].max()) + 1
        if num_seen > 0:  # else every class of the phases so far is removed
            sources_of[new.offsets.index(num_seen) - 1] = phase
    missing = sorted(set(range(max(sources_of) + 1)) - set(sources_of))
    if missing:
        raise ValueError(
            f"{workdir} lacks the phase checkpoints that the edited phases {missing} need; it has "
            f"phases {phases}."
        )
    return sources_of


def _check_exemplars(method_state: dict, y_train: np.ndarray) -> None:
    for key in EXEMPLAR_SETS:
        exemplars = method_state.get(key)
        if isinstance(exemplars, dict) and "indices" in exemplars:
            indices = np.asarray(exemplars["indices"])
            if not np.array_equal(y_train[indices], np.asarray(exemplars["labels"])):
                raise ValueError(f"The edited {key} does not match the edited training set.")


# Grafting.


def graft(
    workdir: str, pattern: str, other_workdir: str, out: str, *, other_phase: int | None = None
) -> dict:
    """Writes to `out` a copy of `workdir` whose newest phase has params grafted from another run.

    The params whose path fully matches the regex `pattern` (and the BatchNorm statistics it
    matches) are read from `other_workdir`'s newest (or `other_phase`) phase checkpoint with
    `surgery.graft_from_checkpoint`; they must have the same shapes. The optimizer and method
    states are kept; the newest phase is evaluated again. Earlier phases are copied unchanged.

    Returns:
      The surgery record (also in `out/surgery.json`), with the grafted paths.

    Raises:
      ValueError: an existing `out`, a pattern that matches nothing, or shapes that differ.
    """
    _check_out(workdir, out)
    other_phase = _pick_phase(other_workdir, other_phase)
    phases = saved_phases(workdir)
    with _checkpoints(workdir) as ckpts:
        rs = setup(config_from_dict(ckpts.read_meta(phases[-1])["config"]))
        last = _restore(ckpts, rs, phases[-1])
        state = dict(last.state)
        state["params"] = surgery.graft_from_checkpoint(
            state["params"], other_workdir, pattern, step=other_phase
        )
        paths = sorted(surgery.select(state["params"], pattern))
        if surgery.select(state["batch_stats"], pattern):
            state["batch_stats"] = surgery.graft_from_checkpoint(
                state["batch_stats"],
                other_workdir,
                pattern,
                step=other_phase,
                subtree="batch_stats",
            )
            paths += sorted(
                f"batch_stats/{p}" for p in surgery.select(state["batch_stats"], pattern)
            )
        last = last._replace(state=state)
        records = list(last.meta["records"][: last.phase + 1])
        with _writing(workdir, out) as writer:
            for phase in phases[:-1]:
                saved = _restore(ckpts, rs, phase)
                writer.save(rs, phase, saved, saved.meta["records"][: phase + 1])
            records[-1] = _record(records[-1], rs, last.phase, last)
            writer.save(rs, last.phase, last, records)
            record = {
                "operation": "graft",
                "pattern": pattern,
                "from": os.path.abspath(other_workdir),
                "from_phase": other_phase,
                "phase": last.phase,
                "paths": paths,
            }
            history = _history(workdir, record)
            writer.finish(rs, records, history)
    return history[-1]


# Presentation.


def evaluation_table(doc: dict):
    """A rich table of an `evaluate` document: accuracy per seen class, then all seen classes."""
    from rich import box
    from rich.table import Table

    extra = list(doc.get("extra", {}))
    named = any(e.get("name", str(e["class"])) != str(e["class"]) for e in doc["per_class"])
    table = Table(
        title=f"{doc['method']} on {doc['dataset']}, phase {doc['phase']}: test accuracy (%)",
        box=box.SIMPLE,
    )
    columns = ("class", *(("name",) if named else ()), "dataset class", "phase", "test", "accuracy")
    for name in (*columns, *extra):
        table.add_column(name, justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}"
    for entry in doc["per_class"]:
        cells = [str(entry["class"]), *((entry["name"],) if named else ())]
        cells += [str(entry["dataset_class"]), str(entry["phase"])]
        cells += [str(entry["num_test"]), pct(entry["accuracy"])]
        table.add_row(*cells, *(pct(entry[f"{name}_accuracy"]) for name in extra))
    table.add_section()
    totals = ["all", *([""] if named else []), "", "", str(doc["num_test"]), pct(doc["accuracy"])]
    table.add_row(*totals, *(pct(doc["extra"][name]["accuracy"]) for name in extra))
    return table
