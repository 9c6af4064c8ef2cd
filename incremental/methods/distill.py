"""What the distillation-based methods share: teacher snapshots and the softened-softmax KD loss."""

from typing import Any

import jax
import optax

PyTree = Any


def copy_tree(tree: PyTree) -> PyTree:
    """Fresh buffers: the train state is donated, so a kept snapshot must not share its arrays."""
    return jax.device_put(tree, may_alias=False)


def snapshot(variables: PyTree) -> dict:
    """A teacher: fresh copies of the variables, without empty collections (an MLP's batch_stats),
    since a checkpoint keeps only arrays."""
    return {k: copy_tree(v) for k, v in variables.items() if jax.tree.leaves(v)}


def kd_loss(logits_BxO: jax.Array, teacher_logits_BxO: jax.Array, temperature: float) -> jax.Array:
    """Per example: cross-entropy between the teacher's and the student's softmax at `temperature`
    (Hinton et al. 2015, without the T^2 factor, as LwF, iCaRL-in-PyCIL, BiC and WA use it)."""
    targets = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits_BxO) / temperature)
    return optax.softmax_cross_entropy(logits_BxO / temperature, targets)
