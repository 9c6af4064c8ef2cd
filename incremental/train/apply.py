"""Applying a model to host data in fixed-size batches (evaluation, embeddings)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from incremental import models, parallel
from incremental.data import device
from incremental.methods import Outputs
from incremental.train.step import apply_any_head


def make_apply_batches(
    model: nn.Module,
    norm: device.Normalizer,
    fn: Callable[[Outputs, dict], jax.Array],
    dtype=jnp.float32,
    *,
    mask: bool = False,
) -> Callable:
    """Returns a jitted `(variables, method_state, x_NBx...) -> fn(outputs)` over batches with `lax.map`.

    `mask=True` (a head with a column for every class, `head.capacity`): the function takes a
    fourth argument, `num_seen`, and the scores of the classes from `num_seen` on are -inf (the
    logits before `fn`, and `fn`'s class scores after it).
    """

    @jax.jit
    def apply_batches(variables, method_state, x_batches, num_seen=None):
        def one(x):
            x = device.normalize(x, norm, dtype)
            feats, logits = apply_any_head(model, variables, x, train=False)
            logits = logits.astype(jnp.float32)
            if mask:
                logits = models.mask_unseen(logits, num_seen)
            scores = fn(Outputs(feats, logits), method_state)
            return models.mask_unseen(scores, num_seen) if mask else scores

        return jax.lax.map(one, x_batches)

    return apply_batches


def run_batched(
    apply_batches: Callable, variables, method_state, x: np.ndarray, batch_size: int, *args
):
    """Applies a `make_apply_batches` function to host data in fixed-size batches; returns numpy.

    `args` follow the batches (a masked function's `num_seen`).
    """
    batches, n = device.padded_batches(x, batch_size)
    mesh = parallel.mesh_of(variables)
    if mesh is not None and jax.process_count() > 1:  # every input must span the same processes
        batches = parallel.replicate(batches, mesh)
    out = parallel.to_host(apply_batches(variables, method_state, batches, *args))
    return out.reshape(-1, *out.shape[2:])[:n]
