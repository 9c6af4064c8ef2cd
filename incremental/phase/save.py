"""The save stage: a phase's checkpoint (at its end, or within it), and resuming from them."""

from __future__ import annotations

import json
import os
from typing import Any

import jax

from incremental import capacity, checkpoint, parallel, report, train
from incremental.config import with_defaults
from incremental.methods import Method
from incremental.phase.begin import Carried, make_tx, phase_info
from incremental.phase.load import RunData
from incremental.phase.model import init_variables, phase_model
from incremental.phase.record import json_default
from incremental.protocol import Protocol

PyTree = Any


def meta(
    config,
    protocol: Protocol,
    phase: int,
    records: list,
    steps: dict | None = None,
    fingerprint: str = "",
) -> dict:
    """The checkpoint's JSON side: where the run is, its records so far, its config and the
    fingerprint of its data."""
    doc = {
        "phase": phase,
        "data_fingerprint": fingerprint,
        "steps": steps,  # within a phase: `Steps.state_dict()`; None at a phase's end
        "records": records,
        "config": config.to_dict(),
        "class_order": list(protocol.class_order),
        "class_names": None if protocol.class_names is None else list(protocol.class_names),
    }
    return json.loads(json.dumps(doc, default=json_default))


def save(
    ckpts: checkpoint.Checkpoints,
    config,
    protocol,
    phase,
    carried: Carried,
    rng,
    records,
    mesh,
    fingerprint: str = "",
):
    """Saves everything the next phase needs, at `phase`'s end."""
    saved = {**carried.variables, "opt_state": carried.opt_state, "rng": rng}
    # Every array on the mesh: orbax saves arrays that span all processes, not ones a hook
    # computed on one.
    saved, method_state = parallel.replicate((saved, carried.method_state), mesh)
    ckpts.save(
        phase, saved, method_state, meta(config, protocol, phase, records, None, fingerprint)
    )


def state_target(config, method: Method, protocol: Protocol, data: RunData, phase: int) -> PyTree:
    """Shapes and types of the state saved at the end of `phase`, for restoring it."""
    config = capacity.resolved(config, method, protocol.num_classes)
    info = phase_info(protocol, phase)
    model = phase_model(config, method, info, final=True)
    key = jax.random.PRNGKey(0)
    variables = jax.eval_shape(lambda: init_variables(model, data.x_train[0], key))
    tx = make_tx(config, method, info, 1, variables["params"])
    opt_state = jax.eval_shape(tx.init, variables["params"])
    return {**variables, "opt_state": opt_state, "rng": jax.eval_shape(lambda: key)}


def resume(
    ckpts, config, method, protocol, data, *, allow_data_change: bool = False
) -> tuple[int, Carried | None, dict, list]:
    """The phase to start from, what the last finished phase left, its method state and the
    records so far, from the work directory.

    A run whose data changed since it was saved (another fingerprint) is refused unless
    `allow_data_change`; each phase's record keeps the fingerprint it trained on.
    """
    config = capacity.resolved(config, method, protocol.num_classes)
    saved = ckpts.latest_meta()
    if saved is not None:
        workdir = os.path.dirname(ckpts.directory)
        # Keys added since the run was saved compare at their defaults: what it ran with.
        diffs = checkpoint.config_diff(with_defaults(saved["config"]), config.to_dict())
        if diffs:
            raise ValueError(
                f"The work directory {workdir} holds a run with a "
                "different config; resume it with the same config or pick a new --workdir. "
                "Differences:\n  " + "\n  ".join(diffs)
            )
        check_data(saved.get("data_fingerprint"), data.fingerprint, workdir, allow_data_change)
    found = ckpts.restore_latest_phase(
        lambda phase: parallel.with_sharding(
            state_target(config, method, protocol, data, phase),
            parallel.make_mesh(config.parallel.devices),
        )
    )
    if found is None:
        return 0, None, method.init_state(), []
    last, state, method_state, saved_meta = found
    return last + 1, carried_of(state, method_state), method_state, saved_meta["records"]


def check_data(saved: str | None, now: str, workdir: str, allow_change: bool) -> None:
    """Refuses to resume on data other than the saved run's (checkpoints from before fingerprints
    were kept have none, and pass)."""
    if not saved or saved == now:
        return
    if not allow_change:
        raise ValueError(
            f"The work directory {workdir} holds a run trained on other data: its fingerprint was "
            f"{saved}, the data loaded now has {now} (the dataset's files changed since the run "
            "stopped). Restore them, or pick a new --workdir; `incremental run` goes on with this "
            "data given --allow_data_change (each phase's record keeps the fingerprint it trained "
            "on)."
        )
    report.console.print(
        f"warning: {workdir}: the data changed since the run stopped ({saved} -> {now}); going on.",
        markup=False,
    )


def restore(ckpts, config, method, protocol, data, phase: int) -> tuple[int, Carried, dict, list]:
    """What `phase`'s end saved (a seed that finished later phases restarts from there)."""
    target = state_target(config, method, protocol, data, phase)
    state, method_state, saved_meta = ckpts.restore(phase, target)
    return (
        phase + 1,
        carried_of(state, method_state),
        method_state,
        saved_meta["records"][: phase + 1],
    )


def carried_of(state: dict, method_state: dict) -> Carried:
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    return Carried(variables, state["opt_state"], method_state)


def restore_within(ckpts, phase: int, state: train.TrainState):
    """The state saved within `phase` (`(state, method_state, steps_dict)`), or None."""
    restored = ckpts.restore_within(phase, state)
    if restored is None:
        return None
    state, method_state, saved_meta = restored
    state = train.TrainState(*state) if not isinstance(state, train.TrainState) else state
    return state, method_state, saved_meta["steps"]
