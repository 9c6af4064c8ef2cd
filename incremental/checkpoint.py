"""Checkpoints of a work directory: orbax `CheckpointManager`s under `<workdir>/checkpoints/`.

- `phase/<p>`: the end of every finished phase, all kept. Restored to resume after phase `p`.
- `step/<n>`: within a phase, every `config.checkpoint.every_steps` steps or `every_epochs` epochs
  and on preemption, written asynchronously, the last `config.checkpoint.keep` kept;
  `n = phase * STEP_STRIDE + step`, where `step` counts the optimizer steps taken in the phase.

Each step holds `state` (params, batch_stats, opt_state, rng, ...), `method` (the method state, when it
has any) and `meta` (JSON: phase, step, results so far, the config). Arrays are restored into the
shapes of the phase that saved them; a wider head for the next phase is made afterwards by the
explicit widening in `surgery`, never by orbax padding. A checkpoint that cannot be read is moved to
`checkpoints/damaged/` with a warning and the next older one is used.

`meta['checksums']` holds a CRC-32 of every saved array (of its shape, dtype and bytes, keyed by
path: `state/params/...`, `method/...`) and of the rest of the meta (`meta`), computed when the
checkpoint is written and checked on every restore: a checkpoint whose bytes changed on disk (a
flipped bit that orbax reads without complaint) is damaged, like an unreadable one. Arrays split
over several processes are not summed (no process holds them whole); checkpoints written before
checksums existed restore unchecked.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

PyTree = Any
STEP_STRIDE = 1_000_000_000

# Config keys that cannot change results; a resumed run may differ in these.
IGNORED_KEYS = ("log", "checkpoint", "compile_cache", "parallel")


def _manager(directory: str, keep: int | None, async_save: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        create=True, max_to_keep=keep, enable_async_checkpointing=async_save
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "method": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


class DamagedCheckpoint(ValueError):
    """A checkpoint whose restored arrays or meta do not match the checksums written with it."""


class WriteFailed(ValueError):
    """The disk refused a checkpoint (full, read-only, a file size limit): nothing saved before is
    lost, and the same command resumes from the last complete checkpoint once there is room."""

    # The writes that were still in flight finish into orbax's closed event loop, which prints a
    # traceback for each at interpreter exit: the command line exits at once after the message.
    exit_at_once = True


# tensorstore, which writes orbax's arrays, reports the operating system's error in its text.
_OS_ERROR = re.compile(r"(Failed to write[^\[]*?: )?([^:\[\]\"]+) \[os_error_code='(\d+)'\]")


@contextlib.contextmanager
def _writing(directory: str) -> Iterator[None]:
    """Turns the disk's refusal to store a checkpoint under `directory` into `WriteFailed`."""
    try:
        yield
    except OSError as error:
        raise WriteFailed(
            _write_failed(directory, error.strerror or str(error), error.errno)
        ) from error
    except ValueError as error:
        found = _OS_ERROR.search(str(error))
        if found is None or isinstance(error, WriteFailed):
            raise
        raise WriteFailed(_write_failed(directory, found[2].strip(), int(found[3]))) from error


def _write_failed(directory: str, reason: str, code: int | None) -> str:
    advice = {
        errno.ENOSPC: "free some space on that disk",
        errno.EDQUOT: "free some of your disk quota",
        errno.EFBIG: "raise the file size limit (ulimit -f)",
        errno.EROFS: "make the file system writable",
        errno.EACCES: "make the directory writable",
    }.get(code, "fix the cause")
    return (
        f"A checkpoint could not be written under {directory}: {reason}"
        f"{f' (errno {code})' if code else ''}. Every checkpoint written before is intact; "
        f"{advice}, then run the same command again to resume from the last complete one."
    )


def checksum(array) -> int:
    """CRC-32 of an array's shape, dtype and bytes (copied to the host if it is not there)."""
    host = np.ascontiguousarray(np.asarray(array))
    header = f"{host.shape} {host.dtype}".encode()
    return zlib.crc32(host.reshape(-1).view(np.uint8), zlib.crc32(header))


def _meta_checksum(meta: dict) -> int:
    rest = {k: v for k, v in meta.items() if k != "checksums"}
    return zlib.crc32(json.dumps(rest, sort_keys=True).encode())


def checksums(trees: dict[str, PyTree]) -> dict[str, int | None]:
    """`checksum` of every array leaf of each tree, keyed `name/path/to/leaf`; None for a leaf
    split over several processes (none holds it whole)."""
    local = {}
    for name, tree in trees.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = f"{name}/{jax.tree_util.keystr(path, simple=True, separator='/')}"
            if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
                leaf = leaf.addressable_data(0) if leaf.is_fully_replicated else None
            local[key] = leaf
    held = jax.device_get({k: v for k, v in local.items() if v is not None})  # one transfer
    return {k: None if v is None else checksum(held[k]) for k, v in local.items()}


def verify(meta: dict, trees: dict[str, PyTree]) -> None:
    """Raises `DamagedCheckpoint` naming the arrays (or the meta) whose checksums differ from
    `meta['checksums']`, or that are missing; a meta without checksums (an older checkpoint) is
    accepted as it is."""
    expected = meta.get("checksums")
    if expected is None:
        return
    actual = checksums(trees)
    missing = sorted(k for k in expected if k != "meta" and k not in actual)
    _refuse_mismatches(meta, actual, missing)


def verify_leaves(meta: dict, leaves: dict[str, Any]) -> None:
    """`verify` for some of a checkpoint's arrays, keyed `item/path` (a graft reads only those)."""
    if meta.get("checksums") is not None:
        _refuse_mismatches(meta, {k: checksum(v) for k, v in leaves.items()}, [])


def _refuse_mismatches(meta: dict, actual: dict[str, int], bad: list[str]) -> None:
    expected = meta["checksums"]
    bad = bad + sorted(
        k for k, v in actual.items() if None not in (v, expected.get(k)) and expected[k] != v
    )
    if expected.get("meta") != _meta_checksum(meta):
        bad.append("meta")
    if bad:
        raise DamagedCheckpoint(
            f"{len(bad)} saved item(s) changed on disk since they were written (checksum "
            f"mismatch): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}."
        )


def _items(state: PyTree, method_state: dict, meta: dict) -> ocp.args.Composite:
    method_state, empty = _split_empty(method_state)
    meta = {**meta, "empty_method_leaves": empty}
    trees = {"state": state, "method": method_state}
    meta["checksums"] = {**checksums(trees), "meta": _meta_checksum(meta)}
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if jax.tree.leaves(method_state):
        items["method"] = ocp.args.StandardSave(method_state)
    return ocp.args.Composite(**items)


def _split_empty(tree: dict, prefix: str = "") -> tuple[dict, dict]:
    """Orbax cannot save zero-size arrays (an empty exemplar memory): keep their shapes in meta."""
    kept, empty = {}, {}
    for key, value in tree.items():
        if isinstance(value, dict):
            kept[key], inner = _split_empty(value, f"{prefix}{key}/")
            empty.update(inner)
        elif getattr(value, "size", 1) == 0:
            empty[f"{prefix}{key}"] = [list(value.shape), str(value.dtype)]
        else:
            kept[key] = value
    return kept, empty


def _merge_empty(tree: dict, empty: dict) -> dict:
    for path, (shape, dtype) in empty.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jax.numpy.zeros(shape, dtype)
    return tree


class Checkpoints:
    """The phase-end and within-phase checkpoints of one work directory."""

    def __init__(self, workdir: str, keep_within: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.phases = _manager(os.path.join(self.directory, "phase"), None, async_save=False)
        self.within = _manager(
            os.path.join(self.directory, "step"), max(1, keep_within), async_save=True
        )

    # Phase ends.
    def latest_phase(self) -> int | None:
        """The last finished phase that has a checkpoint, or None."""
        return self.phases.latest_step()

    def save(self, phase: int, state: PyTree, method_state: dict, meta: dict) -> None:
        """Saves the end of `phase` and waits until it is complete on disk."""
        with _writing(self.directory):
            self.within.wait_until_finished()
            self.phases.save(phase, args=_items(state, method_state, meta))
            self.phases.wait_until_finished()

    def read_meta(self, phase: int) -> dict:
        return self._meta(self.phases, phase)

    def restore(self, phase: int, state_target: PyTree) -> tuple[PyTree, dict, dict]:
        """Restores `(state, method_state, meta)` of `phase`; `state_target` gives shapes and types."""
        return _restore(self.phases, phase, state_target)

    def restore_latest_phase(
        self, target_fn: Callable[[int], PyTree]
    ) -> tuple[int, PyTree, dict, dict] | None:
        """The newest readable phase checkpoint as `(phase, state, method_state, meta)`, or None.

        Unreadable ones are moved aside with a warning; `target_fn(phase)` gives the state's shapes.
        """
        return self._newest(self.phases, lambda step: _restore(self.phases, step, target_fn(step)))

    # Within a phase.
    def save_within(self, phase: int, step: int, state: PyTree, method_state: dict, meta: dict):
        """Starts an asynchronous save after `step` steps of `phase`; `wait()` waits for it."""
        with _writing(self.directory):
            self.within.save(phase * STEP_STRIDE + step, args=_items(state, method_state, meta))

    def within_steps(self, phase: int) -> list[int]:
        """Within-phase checkpoints of `phase`, newest first, as step counts."""
        steps = [s for s in self.within.all_steps() if s // STEP_STRIDE == phase]
        return sorted((s % STEP_STRIDE for s in steps), reverse=True)

    def latest_meta(self) -> dict | None:
        """The meta of the newest checkpoint of either kind (for the config check), or None."""
        for manager in (self.within, self.phases):
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    return self._meta(manager, step)
                except Exception:  # noqa: BLE001 -- an unreadable one is dealt with on restore
                    continue
        return None

    def saved_head_capacity(self) -> int | None:
        """`head.capacity` of the config the newest checkpoint was saved with, or None."""
        meta = self.latest_meta()
        return None if meta is None else meta["config"]["head"]["capacity"]

    def restore_within(self, phase: int, state_target: PyTree) -> tuple[PyTree, dict, dict] | None:
        """The newest readable within-phase checkpoint of `phase` as `(state, method_state, meta)`."""

        def restore(step):
            return _restore(self.within, step, state_target)

        steps = [phase * STEP_STRIDE + s for s in self.within_steps(phase)]
        found = self._newest(self.within, restore, steps)
        return None if found is None else found[1:]

    def wait(self) -> None:
        with _writing(self.directory):
            self.within.wait_until_finished()
            self.phases.wait_until_finished()

    def close(self) -> None:
        with _writing(self.directory):
            self.within.close()
            self.phases.close()

    def _meta(self, manager, step: int) -> dict:
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def _newest(self, manager, restore_fn, steps=None):
        for step in sorted(manager.all_steps() if steps is None else steps, reverse=True):
            try:
                return (step, *restore_fn(step))
            except Exception as error:  # noqa: BLE001 -- any unreadable checkpoint is skipped
                self._move_aside(manager, step, error)
        return None

    def _move_aside(self, manager, step: int, error: Exception) -> None:
        source = os.path.join(str(manager.directory), str(step))
        damaged = os.path.join(self.directory, "damaged")
        os.makedirs(damaged, exist_ok=True)
        target = os.path.join(
            damaged, f"{os.path.basename(str(manager.directory))}-{step}-{time.time_ns()}"
        )
        message = (
            f"Checkpoint {source} cannot be read ({type(error).__name__}: {str(error)[:200]}); "
            f"moved it to {target} and trying the previous one."
        )
        logging.warning(message)
        print(f"warning: {message}", flush=True)
        shutil.move(source, target)
        manager.reload()


def _restore(manager, step: int, state_target: PyTree) -> tuple[PyTree, dict, dict]:
    items = {"state": ocp.args.StandardRestore(state_target), "meta": ocp.args.JsonRestore()}
    if "method" in manager.item_metadata(step):
        items["method"] = ocp.args.StandardRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    verify(restored.meta, {"state": restored.state, "method": restored.get("method") or {}})
    method_state = jax.tree.map(jax.numpy.asarray, restored.get("method") or {})
    method_state = _merge_empty(method_state, restored.meta.get("empty_method_leaves", {}))
    return restored.state, method_state, restored.meta


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts, ignoring `IGNORED_KEYS`."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if not prefix and key in IGNORED_KEYS:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif _normal(a) != _normal(b):
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


def _normal(value):
    return [_normal(v) for v in value] if isinstance(value, list | tuple) else value
