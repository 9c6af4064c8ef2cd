"""DER++, Dark Experience Replay++ (Buzzega et al. 2020, "Dark Experience for General Continual
Learning: a Strong, Simple Baseline", NeurIPS).

Not DER, the dynamically expandable representation of Yan et al. 2021, which is `der` here: DER++
keeps one network and a reservoir memory of past examples with the logits the network gave them
when they arrived ("dark knowledge"). Per step, on the incoming batch B and two memory minibatches
M1 and M2 drawn independently:

    loss = CE(B) + alpha * MSE(f(x'), z') over M1 + beta * CE(f(x''), y'') over M2

where z' are the stored logits. The memory is a reservoir filled in the train step after every
batch (`methods.stream`), with the logits of the forward pass before the update (Mammoth's
`models/derpp.py`, lines 36-58 at e75a491). The head grows with the phases, so a stored example's
logits cover the classes seen when it was stored: the MSE is the mean over those (example, class)
pairs (Mammoth's full-width head compares every class's logit, future ones included). The memory
terms start as soon as the memory holds an example (Mammoth's `if not self.buffer.is_empty()`).

Defaults: alpha 0.1, beta 0.5, the paper's and Mammoth's choice for Seq-CIFAR-10 with 200 stored
examples (`utils/best_args.py` lines 659-664 at e75a491: lr 0.03, batch and minibatch 32, 50
epochs); for the online Seq-MNIST setting (batch 10, one epoch, 200 stored) Mammoth gives alpha 0.2,
beta 1.0, minibatch 128, lr 0.03 (lines 481-486). `minibatch_size` 0 is the train batch size, as in
Mammoth when it is not given (`main.py` line 436).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import Batch, MemoryBatch, Outputs
from incremental.methods.stream import StreamRehearsal, masked_mean, per_example


def logit_distance(drawn: MemoryBatch) -> jax.Array:
    """Per example, the mean squared difference between its logits now and the stored ones, over
    the classes the head had when it was stored; (B,) and the number of classes compared."""
    now = drawn.out.logits.astype(jnp.float32)
    valid = jnp.arange(now.shape[-1])[None, :] < drawn.logit_cols[:, None]
    diff = jnp.where(valid, now, 0.0) - drawn.logits  # -inf columns never enter arithmetic
    return models.sum_classes(jnp.where(valid, diff * diff, 0.0)), valid.sum(-1)


@dataclasses.dataclass(frozen=True)
class DERpp(StreamRehearsal):
    name = "der_pp"
    keeps_logits = True

    alpha: float = 0.1  # weight of the stored logits' MSE
    beta: float = 0.5  # weight of the memory's cross-entropy

    def __post_init__(self):
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(
                f"method_args.alpha and beta must be >= 0, got {self.alpha} and {self.beta}."
            )

    def draw_memory(self, method_state: dict, key: jax.Array, batch_size: int) -> dict:
        return {
            "logits": self.drawn(method_state, jax.random.fold_in(key, 0), batch_size),
            "labels": self.drawn(method_state, jax.random.fold_in(key, 1), batch_size),
        }

    def loss(self, out: Outputs, batch: Batch, *, params, method_state, info, apply_fn):
        del params, method_state, info, apply_fn
        ce = models.cross_entropy(out.logits, batch.y)
        first, second = batch.memory["logits"], batch.memory["labels"]
        sq, cols = logit_distance(first)
        weight = first.weight * (cols > 0)
        mse = (sq * weight).sum() / jnp.maximum((cols * weight).sum(), 1)
        replay = masked_mean(models.cross_entropy(second.out.logits, second.y), second.weight)
        mse, replay = per_example(mse, ce), per_example(replay, ce)
        total = ce + self.alpha * mse + self.beta * replay
        return total, {"ce": ce, "mse": mse, "replay_ce": replay}
