"""What the methods with a stream memory share (`der_pp`, `er_ace`, `agem`): a fixed-size memory of
stored inputs in the method state, filled inside the jitted train step after every batch by
reservoir sampling (`memory.reservoir_add`, `memory.selection=reservoir`) and drawn from there
(`memory.draw`), so that they learn online (each example seen once) and offline alike.

The memory holds `memory.budget` examples in total whatever the number of classes seen (a reservoir
keeps no per-class count, so `memory.per_class` is refused). It keeps the stored inputs themselves:
the train step sees the phase's arrays (or a host stream), not the whole training set. Offline, every
epoch's batches are offered to it, as in Mammoth (an example may then be held twice). Its random
draws come from the step's key, a function of the phase's key and the step, and the memory is
checkpointed with the method state, so a resumed run draws and keeps what an uninterrupted one does.
The memory minibatches are augmented and normalised like the batch and go through the same forward
pass (so BatchNorm sees them together, as with Mammoth's ER); the linear head predicts. In the task
scenario the incoming batch's logits are masked to each example's task (`PhaseSetup.task_offsets`)
but the memory minibatches' are not: their losses see every seen class's logits, as Mammoth trains
these methods in every setting (it masks by task only when it evaluates), and DER++'s stored logits
are every seen class's.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from incremental import memory as memory_lib
from incremental.memory import MemoryConfig
from incremental.methods.base import Batch, MemoryBatch, Method, PhaseContext


def masked_mean(values: jax.Array, weight: jax.Array) -> jax.Array:
    """The mean of `values` over the examples of weight 1; 0 when there are none (empty memory)."""
    return (values * weight).sum() / jnp.maximum(weight.sum(), 1.0)


def per_example(term: jax.Array, like: jax.Array) -> jax.Array:
    """A batch-level term as a per-example one: added to every example's loss, it enters the
    step's mean over the batch once."""
    return jnp.broadcast_to(term, like.shape)


@dataclasses.dataclass(frozen=True)
class StreamRehearsal(Method):
    """Base for methods whose memory is a reservoir filled in the train step."""

    name = "stream_rehearsal"
    dynamic_phase = True
    train_keys = ("memory",)
    eval_keys = ()
    keeps_logits: ClassVar[bool] = False  # DER++: each stored example's logits are kept too

    memory: MemoryConfig = MemoryConfig(budget=200, selection="reservoir")
    minibatch_size: int = 0  # examples per memory minibatch; 0: the train batch size (Mammoth's)

    def __post_init__(self):
        if self.memory.selection != "reservoir":
            raise ValueError(
                f"{self.name} fills its memory in the train step by reservoir sampling; set "
                f"memory.selection=reservoir (got {self.memory.selection!r})."
            )
        if self.memory.per_class:
            raise ValueError(
                f"{self.name}'s reservoir keeps memory.budget examples in total, not a number per "
                "class; set memory.per_class=0 and memory.budget."
            )
        if self.minibatch_size < 0:
            raise ValueError(f"method_args.minibatch_size must be >= 0, got {self.minibatch_size}.")

    def init_state(self) -> dict:
        return {}

    def begin_phase(self, ctx: PhaseContext, variables, method_state: dict) -> dict:
        """Makes the memory before phase 0 (its shape is the data's), and widens its logits with
        the head."""
        width = variables["params"]["head"]["kernel"].shape[-1] if self.keeps_logits else 0
        memory = method_state.get("memory")
        if memory is None:
            memory = memory_lib.stream_memory(self.memory.budget, ctx.x_train[0], width)
        return {**method_state, "memory": memory_lib.widen_logits(memory, width)}

    def drawn(self, method_state: dict, key: jax.Array, batch_size: int) -> MemoryBatch:
        """One memory minibatch of `minibatch_size` (or `batch_size`) examples."""
        part = memory_lib.draw(method_state["memory"], key, self.minibatch_size or batch_size)
        # An empty slot's label (-1) could pick a -inf logit: a loss of inf times a weight of 0.
        labels = jnp.where(part["weight"] > 0, part["labels"], 0)
        return MemoryBatch(part["x"], labels, part["weight"], part["logits"], part["logit_cols"])

    def observe(self, method_state: dict, batch: Batch, *, logits, key) -> dict:
        memory = memory_lib.reservoir_add(
            method_state["memory"],
            batch.x,
            batch.y,
            batch.weight,
            key,
            logits if self.keeps_logits else None,
        )
        return {**method_state, "memory": memory}
