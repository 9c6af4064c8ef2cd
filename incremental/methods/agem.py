"""A-GEM, averaged gradient episodic memory (Chaudhry et al. 2019, "Efficient Lifelong Learning with
A-GEM", ICLR).

Per step, the gradient g of the incoming batch's cross-entropy is compared with a reference
gradient g_ref, that of the cross-entropy on a minibatch of the memory at the same parameters. When
g would raise the memory's loss (g . g_ref < 0) it is projected onto the half-space where it does
not: g~ = g - (g . g_ref / g_ref . g_ref) g_ref, so that g~ . g_ref = 0 (over the whole parameter
vector). The optimizer then applies g~ (with its weight decay, as Mammoth's SGD would).

The memory is a reservoir filled in the train step after every batch (`methods.stream`), as in
Mammoth's `models/agem_r.py` (lines 40-67 at e75a491), which projects whenever the memory holds an
example; the paper's and Mammoth's `agem.py` fill the memory with each task's examples at its end,
which an online stream cannot do. The reference minibatch is augmented like the batch and has its
own forward pass (it does not share the batch's BatchNorm statistics).

Defaults: `minibatch_size` 0, the train batch size (Mammoth, when not given); Mammoth's online
Seq-MNIST setting (batch 10, one epoch, 200 stored) uses a reference minibatch of 128 and lr 0.1
(`utils/best_args.py` lines 373-376 at e75a491).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import Batch
from incremental.methods.stream import StreamRehearsal

PROJECTED = "reference"  # the memory minibatch's name


def tree_vdot(a, b) -> jax.Array:
    """The dot product of two trees of the same structure, as flat vectors.

    Each leaf is summed over its other axes first, then over its last one in the head's blocks
    (`models.sum_classes`): a head's zero columns for classes not seen yet (`head.capacity`) leave
    the sum as it is on the widening path, bit for bit.
    """
    total = jnp.zeros((), jnp.float32)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        product = (x * y).astype(jnp.float32)
        rows = product.reshape(-1, product.shape[-1]).sum(0) if product.ndim else product[None]
        total = total + models.sum_classes(rows[None, :])[0]
    return total


def project(grads, ref, use: jax.Array | bool = True):
    """A-GEM's projection of `grads` against `ref`: unchanged when their dot product is >= 0 (or
    `use` is False, or `ref` is zero), else with its component along `ref` removed."""
    dot, norm = tree_vdot(grads, ref), tree_vdot(ref, ref)
    apply = jnp.asarray(use) & (dot < 0) & (norm > 0)
    coef = jnp.where(apply, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jax.tree.map(lambda g, r: jnp.where(apply, g - coef * r, g), grads, ref)


@dataclasses.dataclass(frozen=True)
class AGEM(StreamRehearsal):
    name = "agem"
    forward_memory = False  # the reference minibatch gets its own forward pass, in `grad_of`

    def draw_memory(self, method_state: dict, key: jax.Array, batch_size: int) -> dict:
        return {PROJECTED: self.drawn(method_state, key, batch_size)}

    def project_grads(self, grads, *, grad_of, batch: Batch):
        drawn = batch.memory[PROJECTED]
        held = drawn.weight.sum() > 0
        # An empty memory's minibatch gets weights of 1 so that its (unused) gradient is finite.
        weight = jnp.where(held, drawn.weight, jnp.ones_like(drawn.weight))
        ref = grad_of(Batch(drawn.x, drawn.y, weight))
        return project(grads, ref, held)
