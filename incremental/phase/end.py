"""The end stage: the method's `compress` (the phase's final model) and `end_phase` (memory,
calibration), after the epochs."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from incremental import train
from incremental.methods import Method
from incremental.phase.begin import Carried, PhaseRun, make_tx
from incremental.phase.context import make_context
from incremental.phase.load import RunData
from incremental.phase.model import phase_model


class Ended(NamedTuple):
    """A phase's final model and what it carries into the next phase."""

    model: Any  # the final model (evaluated, saved and carried)
    carried: Carried


def end(
    config, method: Method, data: RunData, pr: PhaseRun, state: train.TrainState, method_state: dict
) -> Ended:
    """Runs the method's `compress` and `end_phase` on the trained state."""
    info = pr.info
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    variables, method_state = method.compress(pr.ctx, variables, method_state)
    model, ctx, opt_state = pr.model, pr.ctx, state.opt_state
    final = phase_model(config, method, info, final=True)
    if final != model:
        model, ctx = final, make_context(config, data, info, method, final=True)
    if jax.tree.structure(variables["params"]) != jax.tree.structure(state.params):
        # The trained optimizer state fits other params: a fresh one for the final model's.
        tx = make_tx(config, method, info, pr.steps_per_epoch, variables["params"])
        opt_state = tx.init(variables["params"])
    method_state = method.end_phase(ctx, variables, method_state)
    return Ended(model, Carried(variables, opt_state, method_state))
