"""`make_train_epoch`: a pure step, a batch source and a loop driver, composed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from incremental.data import device
from incremental.methods import Method, PhaseInfo, PhaseSetup
from incremental.train import loops
from incremental.train.batches import Gather, RowTable
from incremental.train.step import make_loss, make_step

LOOPS = ("scan", "steps")


def make_train_epoch(
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    method: Method,
    info: PhaseInfo | None,
    setup: PhaseSetup,
    norm: device.Normalizer,
    batch_size: int,
    augment: device.Augment = device.NO_AUGMENT,
    dtype=jnp.float32,
    steps_per_call: int | None = None,
    loop: str = "scan",
    batch_sharding: jax.sharding.Sharding | None = None,
    stream: Any = None,
    hyperparams: Callable | None = None,
) -> Callable:
    """Returns `train_epoch(state, method_state, x, y) -> (state, method_state, metrics)`.

    `x`, `y` are the phase's device-resident training arrays. Every batch is a function of
    `(state.rng, state.step)` alone (`train.batches`), so the batches continue exactly from any
    saved `state`. One call runs to the end of its epoch or `steps_per_call` steps (`train.loops`).

    `loop` is 'scan' (one `lax.scan`), 'steps' (a Python loop over a jitted step: faster for
    convolutions on CPU) or 'stream' (batches from `stream`, a `data.stream.StreamingBatches` over
    the phase's examples, instead of `x`, `y`; pass None for them).

    `batch_sharding` (`parallel.batch_sharding(mesh)`) shards each batch over a mesh's devices.

    `hyperparams` (`phase_hyperparams(config)`, with `tx` from `make_optimizer(..., dynamic=True)`
    and `info=None`) makes one program for every phase (`head.capacity`): the function takes a
    fifth argument, the phase's `PhaseArgs`, and `x`, `y` are the whole training set (`RowTable`);
    with loop='stream' (and `stream=None`), `x` is the phase's `StreamingBatches` and `y` None.
    """
    if loop not in (*LOOPS, "stream"):
        raise ValueError(f"Unknown train loop {loop!r}; choose one of {LOOPS}.")
    if hyperparams is not None and (stream is not None or info is not None):
        raise ValueError(
            "A train epoch for every phase takes its phase as PhaseArgs (info=None), and its "
            "stream (loop='stream') as `x` at each call."
        )
    if (loop == "stream") != (stream is not None) and hyperparams is None:
        raise ValueError("loop='stream' and a `stream` of batches go together.")
    step = make_step(
        make_loss(model, method, info, setup),
        tx,
        method,
        norm=norm,
        batch_size=batch_size,
        augment=augment,
        dtype=dtype,
        batch_sharding=batch_sharding,
        hyperparams=hyperparams,
    )
    if loop == "stream":
        return loops.stream(step, stream, steps_per_call)
    source = (Gather if hyperparams is None else RowTable)(batch_size)
    return getattr(loops, loop)(step, source, steps_per_call)
