"""What the distillation-based methods share: teacher snapshots and the softened-softmax KD loss."""

from typing import Any

import jax
import jax.numpy as jnp

from incremental import models

PyTree = Any


def copy_tree(tree: PyTree) -> PyTree:
    """Fresh buffers: the train state is donated, so a kept snapshot must not share its arrays."""
    return jax.device_put(tree, may_alias=False)


def snapshot(variables: PyTree) -> dict:
    """A teacher: fresh copies of the variables, without empty collections (an MLP's batch_stats),
    since a checkpoint keeps only arrays."""
    return {k: copy_tree(v) for k, v in variables.items() if jax.tree.leaves(v)}


def kd_loss(
    logits_BxC: jax.Array,
    teacher_logits_BxT: jax.Array,
    temperature: float,
    num_old: int | jax.Array | None = None,
) -> jax.Array:
    """Per example: cross-entropy between the teacher's and the student's softmax at `temperature`
    (Hinton et al. 2015, without the T^2 factor, as LwF, iCaRL-in-PyCIL, BiC and WA use it), over
    the first `num_old` classes (the teacher's, by default).

    Either array may have more columns (a student's new classes, a `head.capacity` head's unseen
    ones): only the first `num_old` count, and `num_old` may be traced. The sums over classes run
    in the head's blocks (`models.soft_cross_entropy`), so every head width gives the same numbers.
    """
    num_old = teacher_logits_BxT.shape[-1] if num_old is None else num_old
    width = min(logits_BxC.shape[-1], teacher_logits_BxT.shape[-1])
    teacher = jax.lax.stop_gradient(teacher_logits_BxT[:, :width]) / temperature
    targets = jnp.exp(models.log_softmax(teacher, num_old))
    return models.soft_cross_entropy(logits_BxC[:, :width] / temperature, targets, num_old)


def old_share(num_old: int | jax.Array, num_new: int | jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(num_old / num_seen, num_new / num_seen)` as float32: BiC's and WA's weights of KD and CE.

    The counts are Python numbers when the head widens every phase and traced under
    `head.capacity`; behind an optimisation barrier both are runtime values, so XLA cannot fold
    constant weights into the gradient's arithmetic (which moved the parameters ~6e-8 a phase).
    Measured on CPU: phases 1-2 of a 4-phase digits run bit-identical, phase 3 3e-8 apart.
    """
    old, new = jax.lax.optimization_barrier(
        (jnp.asarray(num_old, jnp.float32), jnp.asarray(num_new, jnp.float32))
    )
    return old / (old + new), new / (old + new)
