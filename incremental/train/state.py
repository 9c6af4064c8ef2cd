"""The train state and the phase as arrays: the plain pytrees the train step passes around."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

PyTree = Any


class TrainState(NamedTuple):
    """Everything the train step updates; a plain pytree."""

    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: jax.Array  # the phase's training key: every batch is a function of (rng, step)
    step: jax.Array  # steps taken in this phase


class PhaseArgs(NamedTuple):
    """A phase as arrays, for a train epoch compiled once for every phase (`head.capacity`).

    The epoch then takes the whole training set, and trains on the rows `rows[:num_train]` of it;
    `rows` has a fixed length (the training set's), padded with zeros. The learning rate, weight
    decay and milestones are inputs too, so phases and runs that differ only in them share it.
    """

    phase: jax.Array  # int32 scalars
    num_old: jax.Array
    num_new: jax.Array
    num_train: jax.Array
    rows: jax.Array  # (slots,) int32
    hparams: PyTree  # the phase's `train.PhaseHparams` as arrays (`train.phase_arrays`)
