"""Loop drivers of the train epoch: how a call runs a phase's steps.

Each returns `train_epoch(state, method_state, x_all, y_all[, args]) -> (state, method_state,
metrics)`. One call runs from `state.step` to the end of its epoch, or `steps_per_call` steps if
that comes first; `metrics` hold each step's values, of which the first `metrics['steps']` are real.

- `scan`: one jitted `lax.scan` of fixed length over a source's batches (steps past the epoch's end
  are skipped), so a call compiles once; the fastest on accelerators.
- `steps`: a Python loop over one jitted step, for convolutional models on CPU, where XLA runs
  convolution gradients many times slower inside a loop than outside one.
- `stream`: a Python loop over one jitted step fed from a host stream of batches (the phase's own,
  or under `head.capacity` the one passed as `x_all`).

`state` is donated; `method_state` is not (it may hold a teacher the caller still needs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from incremental import parallel
from incremental.train.batches import Gather


def scan(step: Callable, source: Gather, steps_per_call: int | None) -> Callable:
    """The epoch as one `lax.scan` over the source's batches."""

    @jax.jit  # traced once, for the metrics' shapes and for the loop's body
    def one_step(state, method_state, x_all, y_all, idx_b, weight_b, args):
        x, y = source.batch(x_all, y_all, idx_b, args)
        return step(state, method_state, x, y, weight_b, args)

    @functools.partial(jax.jit, donate_argnames=("state",))
    def train_epoch(state, method_state, x_all, y_all, args=None):
        idx, weight, first, per_epoch = source.order(state, x_all, args)
        most = idx.shape[0]  # the epoch's length, or its longest under `PhaseArgs`
        length = min(steps_per_call or most, most)
        # Room for a call that starts late in the epoch; the rows past its end are never used.
        idx = jax.lax.dynamic_slice_in_dim(jnp.pad(idx, ((0, length), (0, 0))), first, length)
        weight = jax.lax.dynamic_slice_in_dim(jnp.pad(weight, ((0, length), (0, 0))), first, length)
        count = jnp.minimum(length, per_epoch - first)
        shapes = jax.eval_shape(
            one_step, state, method_state, x_all, y_all, idx[0], weight[0], args
        )
        no_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2])

        def body(carry, inputs):
            i, idx_b, weight_b = inputs
            state, method_state, metrics = jax.lax.cond(
                i < count,
                lambda s, m: one_step(s, m, x_all, y_all, idx_b, weight_b, args),
                lambda s, m: (s, m, no_metrics),
                *carry,
            )
            return (state, method_state), metrics

        inputs = (jnp.arange(length), idx, weight)
        (state, method_state), metrics = jax.lax.scan(body, (state, method_state), inputs)
        return state, method_state, {**metrics, "steps": count}

    return train_epoch


def steps(step: Callable, source: Gather, steps_per_call: int | None) -> Callable:
    """The epoch as a Python loop over one jitted step; its order is drawn once per call."""
    epoch_order = jax.jit(lambda state, x_all, args: source.order(state, x_all, args)[:2])

    @functools.partial(jax.jit, donate_argnames=("state",))
    def single_step(state, method_state, x_all, y_all, idx, weight, args):
        first = source.position(state, x_all, args)
        x, y = source.batch(x_all, y_all, idx[first], args)
        return step(state, method_state, x, y, weight[first], args)

    def train_epoch(state, method_state, x_all, y_all, args=None):
        num_examples = int(parallel.to_host(source.size(x_all, args)[0]))
        order = epoch_order(state, x_all, args)
        batches = iter(lambda: (x_all, y_all, *order, args), None)
        per_epoch = -(-num_examples // source.batch_size)
        return host_loop(single_step, state, method_state, batches, per_epoch, steps_per_call)

    return train_epoch


def stream(step: Callable, source, steps_per_call: int | None):
    """The epoch over a `StreamingBatches`' host batches: `source`'s, or with `source=None` (one
    jitted step for every phase, `head.capacity`) those of the stream passed as `x_all`, and the
    phase's `args` passed on to every step."""
    jitted = jax.jit(step, donate_argnames=("state",))

    def train_epoch(state, method_state, x_all=None, y_all=None, args=None):
        del y_all  # the batches come from the host
        feed = source or x_all
        batches = feed.batches(state.rng, int(parallel.to_host(state.step)))
        inputs = batches if args is None else (b + (args,) for b in batches)
        try:
            return host_loop(
                jitted, state, method_state, inputs, feed.steps_per_epoch, steps_per_call
            )
        finally:
            batches.close()  # stops the host readers of the rest of the epoch

    return train_epoch


def host_loop(jitted, state, method_state, batches: Iterator, per_epoch, steps_per_call):
    """Calls `jitted(state, method_state, *next(batches))` to the epoch's end or `steps_per_call`."""
    step = int(parallel.to_host(state.step))  # an explicit read: one scalar per call
    count = min(steps_per_call or per_epoch, per_epoch - step % per_epoch)
    metrics = []
    for _ in range(count):
        state, method_state, step_metrics = jitted(state, method_state, *next(batches))
        metrics.append(step_metrics)
    metrics = jax.tree.map(lambda *values: jnp.stack(values), *metrics)
    return state, method_state, {**metrics, "steps": count}
