"""Checkpoints: an orbax `CheckpointManager` in `<workdir>/checkpoints`, one step per finished phase.

Each step holds three items: `state` (params, batch_stats, opt_state, rng), `method` (the method state,
when it has any) and `meta` (JSON: phase, class order, results so far, the config). Arrays are restored
into the shapes of the phase that saved them; a wider head for the next phase is made afterwards by the
explicit widening in `surgery`, never by orbax padding.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

# Config keys that cannot change results; a resumed run may differ in these.
IGNORED_KEYS = ("log", "workdir")


class Checkpoints:
    """The phase checkpoints of one work directory."""

    def __init__(self, workdir: str):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(create=True, max_to_keep=None)
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "method": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_phase(self) -> int | None:
        """The last finished phase that has a checkpoint, or None."""
        return self.manager.latest_step()

    def save(self, phase: int, state: PyTree, method_state: dict, meta: dict) -> None:
        """Saves the end of `phase` and waits until it is on disk."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if jax.tree.leaves(method_state):
            items["method"] = ocp.args.StandardSave(method_state)
        self.manager.save(phase, args=ocp.args.Composite(**items))
        self.manager.wait_until_finished()

    def read_meta(self, phase: int) -> dict:
        return self.manager.restore(
            phase, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta

    def restore(self, phase: int, state_target: PyTree) -> tuple[PyTree, dict, dict]:
        """Restores `(state, method_state, meta)` of `phase`; `state_target` gives shapes and types."""
        items = {
            "state": ocp.args.StandardRestore(state_target),
            "meta": ocp.args.JsonRestore(),
        }
        if "method" in self.manager.item_metadata(phase):
            items["method"] = ocp.args.StandardRestore()
        restored = self.manager.restore(phase, args=ocp.args.Composite(**items))
        method_state = restored.get("method") or {}
        return restored.state, jax.tree.map(jax.numpy.asarray, method_state), restored.meta

    def close(self) -> None:
        self.manager.close()


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
