"""Training a phase: the train state, the optimizer, and the jitted epoch, composed from parts.

step.py     the pure step: (state, method_state, batch) -> (state, method_state, metrics)
batches.py  batch sources: a gather from device arrays, the capacity row table
            (a host stream is `data.stream.StreamingBatches`)
loops.py    loop drivers: one `lax.scan` per call, a Python loop over a jitted step, a stream
epoch.py    `make_train_epoch`: a step, a source and a driver, composed
optim.py    the phase's optimizer and schedule
apply.py    applying a model to host data in batches (evaluation, embeddings)
"""

from incremental.data.device import AUGMENT, ORDER
from incremental.train.apply import make_apply_batches, run_batched
from incremental.train.epoch import LOOPS, make_train_epoch
from incremental.train.optim import (
    NUM_FROZEN,
    OPTIMIZERS,
    SCHEDULES,
    PhaseHparams,
    carry_opt_state,
    make_optimizer,
    make_schedule,
    phase_arrays,
    phase_hparams,
    phase_hyperparams,
)
from incremental.train.state import PhaseArgs, TrainState
from incremental.train.step import apply_any_head

__all__ = [
    "AUGMENT",
    "LOOPS",
    "NUM_FROZEN",
    "OPTIMIZERS",
    "ORDER",
    "SCHEDULES",
    "PhaseArgs",
    "PhaseHparams",
    "TrainState",
    "apply_any_head",
    "carry_opt_state",
    "make_apply_batches",
    "make_optimizer",
    "make_schedule",
    "make_train_epoch",
    "phase_hparams",
    "phase_arrays",
    "phase_hyperparams",
    "run_batched",
]
