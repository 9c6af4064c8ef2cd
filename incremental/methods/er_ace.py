"""ER-ACE, experience replay with asymmetric cross-entropy (Caccia et al. 2022, "New Insights on
Reducing Abrupt Representation Change in Online Continual Learning", ICLR).

When new classes arrive, plain replay pushes the old classes' logits down on every incoming example
and the old classes' features drift. ER-ACE makes the cross-entropy asymmetric: the incoming batch's
is over the classes present in that batch only (the others' logits get no gradient from it), the
memory minibatch's over every class seen. The memory is a reservoir filled in the train step after
every batch (`methods.stream`).

As in Mammoth's `models/er_ace.py` (lines 57-91 at e75a491) and the authors' code, both the mask and
the replay start with the second phase (`task_free=True`: from the first step). Mammoth's full-width
head also leaves the classes after the largest label seen unmasked, so that future classes' logits
are pushed down; here the head has no column for a class before its phase, so the mask is the
present classes alone. Mammoth's version swaps the head for a cosine classifier by default
(`use_custom_classifier`); here the config's head is used (`head='linear'`).

Defaults: `minibatch_size` 0, the train batch size (the paper's online runs: batch 10, memory
batch 10); Mammoth's Seq-CIFAR-10 setting with 200 stored is lr 0.1, `task_free` on
(`models/config/er_ace.yaml`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import Batch, Outputs
from incremental.methods.stream import StreamRehearsal, masked_mean, per_example


def present_classes(y: jax.Array, weight: jax.Array, num_classes: int) -> jax.Array:
    """(C,) whether each class has a real example in the batch."""
    return jnp.zeros((num_classes,), bool).at[y].max(weight > 0)


@dataclasses.dataclass(frozen=True)
class ERACE(StreamRehearsal):
    name = "er_ace"

    task_free: bool = False  # mask and replay from the first step, not from the second phase

    def draw_memory(self, method_state: dict, key: jax.Array, batch_size: int) -> dict:
        return {"replay": self.drawn(method_state, key, batch_size)}

    def loss(self, out: Outputs, batch: Batch, *, params, method_state, info, apply_fn):
        del params, method_state, apply_fn
        started = jnp.asarray(self.task_free) | (jnp.asarray(info.num_old) > 0)
        present = present_classes(batch.y, batch.weight, out.logits.shape[-1])
        # The padding of a last batch is no class's presence; it keeps every logit (a finite loss
        # that its weight of 0 removes).
        keep = present[None, :] | ~started | (batch.weight[:, None] == 0)
        ce = models.cross_entropy(jnp.where(keep, out.logits, -jnp.inf), batch.y)
        drawn = batch.memory["replay"]
        replay = masked_mean(models.cross_entropy(drawn.out.logits, drawn.y), drawn.weight)
        replay = per_example(jnp.where(started, replay, 0.0), ce)
        return ce + replay, {"ce": ce, "replay_ce": replay}
