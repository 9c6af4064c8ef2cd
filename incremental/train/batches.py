"""Batch sources of the train epoch: where a step's batch comes from.

- `Gather`: the phase's training arrays are on the device; epoch `e` is the permutation
  `device.batch_indices(device.epoch_key(rng, e), ...)` and a step gathers its rows of it.
- `RowTable`: the whole training set is on the device and the phase is a table of its rows
  (`PhaseArgs.rows`, `head.capacity`): the same permutation over a traced number of rows, looked up
  in the table, so one program serves phases of every size.
- A host stream (`data.stream.StreamingBatches`) yields the same batches read on the host, for
  datasets that do not fit on the device.

A source's `order(state, x_all, args)` gives the epoch of `state.step` as `(idx, weight, first,
per_epoch)`: the epoch's batches of positions and weights, the step's position in it, and the
epoch's length; `batch(x_all, y_all, idx_b, args)` gathers one batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from incremental.data import device
from incremental.train.state import PhaseArgs, TrainState


@dataclasses.dataclass(frozen=True)
class Gather:
    """Batches gathered from the phase's device-resident arrays."""

    batch_size: int

    def size(self, x_all: jax.Array, args: PhaseArgs | None) -> tuple[int | jax.Array, int]:
        """The phase's example count and its permutation's length."""
        del args
        return x_all.shape[0], x_all.shape[0]

    def order(self, state: TrainState, x_all: jax.Array, args: PhaseArgs | None):
        num_examples, slots = self.size(x_all, args)
        per_epoch = -(-num_examples // self.batch_size)
        epoch, first = jnp.divmod(state.step, per_epoch)
        key = device.epoch_key(state.rng, epoch)
        idx, weight = device.batch_indices(key, num_examples, self.batch_size, slots)
        return idx, weight, first, per_epoch

    def position(self, state: TrainState, x_all: jax.Array, args: PhaseArgs | None) -> jax.Array:
        """The step's position in its epoch (`order`'s `first`, without drawing the epoch)."""
        num_examples, _ = self.size(x_all, args)
        return state.step % -(-num_examples // self.batch_size)

    def batch(self, x_all, y_all, idx_b: jax.Array, args: PhaseArgs | None):
        rows = self.rows(idx_b, args)
        return x_all[rows], y_all[rows]

    def rows(self, idx_b: jax.Array, args: PhaseArgs | None) -> jax.Array:
        del args
        return idx_b


@dataclasses.dataclass(frozen=True)
class RowTable(Gather):
    """Batches of the rows `args.rows[:args.num_train]` of the whole device-resident training set."""

    def size(self, x_all: jax.Array, args: PhaseArgs) -> tuple[jax.Array, int]:
        del x_all
        return args.num_train, args.rows.shape[0]

    def rows(self, idx_b: jax.Array, args: PhaseArgs) -> jax.Array:
        return args.rows[idx_b]
