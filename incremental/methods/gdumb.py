"""GDumb, greedy sampler and dumb learner (Prabhu et al. 2020, "GDumb: A Simple Approach that
Questions Our Progress in Continual Learning", ECCV).

GDumb learns nothing from the stream itself. A greedy class-balanced sampler fills a memory of
`memory.budget` examples as they arrive (`memory.balanced_add`: stored while there is room; once
full, an example of a class holding fewer than budget / classes-seen is stored in place of a random
example of the largest class), and at every evaluation point a model is trained from scratch on the
memory alone. Here the evaluation points are the phase ends (`protocol.eval_every_steps` is refused:
each point would train a model): the phase takes no step on its stream (`PhaseSetup.train=False`),
its `compress` stage updates the memory with the phase's examples in a seeded order and trains a
fresh model on it through the context's `fit` service.

"From scratch" is the run's initial model: its backbone and the head columns every class got when
its phase began (kept in the method state), before any training.

Training follows Mammoth's `models/gdumb.py` (lines 17-56 at e75a491) and the paper: SGD, one epoch
at 0.1 * max_lr, then cosine annealing with warm restarts (periods 1, 2, 4, ... epochs) from
`max_lr` 0.05 to `min_lr` 0.0005, `epochs` 256 (Mammoth's `fitting_epochs`); momentum 0.9, weight
decay 1e-6 and gradient clipping at norm 10 are the paper's (Mammoth defaults to none of them). The
batch size is the run's `train.batch_size` (the paper's is 16). The paper's CutMix (Mammoth's
`cutmix_alpha` 1.0) is left out.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import memory as memory_lib
from incremental.memory import MemoryConfig
from incremental.methods.base import Method, PhaseContext, PhaseInfo, PhaseSetup, phase_data
from incremental.methods.distill import copy_tree, snapshot

SEED = 0x6D  # folds GDumb's randomness out of the run's seed and the phase


def warm_restarts(max_lr: float, min_lr: float, steps_per_epoch: int) -> optax.Schedule:
    """Mammoth's GDumb schedule per step: epoch 0 at 0.1 * max_lr; from epoch e >= 1, cosine
    annealing over cycles of 1, 2, 4, ... epochs (cycle i covers epochs [2^i, 2^(i+1)))."""

    def schedule(count):
        epoch = (count // steps_per_epoch).astype(jnp.int32)
        cycle = 31 - jax.lax.clz(jnp.maximum(epoch, 1))
        length = jnp.left_shift(1, cycle)
        phase = (epoch - length).astype(jnp.float32) / length.astype(jnp.float32)
        cosine = min_lr + (max_lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * phase))
        return jnp.where(epoch == 0, 0.1 * max_lr, cosine)

    return schedule


def fresh_head(init: dict, head: dict, num_old: int) -> dict:
    """`init`'s head columns of the first `num_old` classes, then `head`'s (a phase's new columns,
    as the phase began)."""
    return {
        k: jnp.concatenate([v[..., :num_old], head[k][..., num_old:]], -1) for k, v in init.items()
    }


@dataclasses.dataclass(frozen=True)
class GDumb(Method):
    name = "gdumb"
    dynamic_phase = True
    train_keys = ()
    eval_keys = ()
    trains_at_evaluation: ClassVar[bool] = True  # a model per evaluation point

    memory: MemoryConfig = MemoryConfig(budget=200, selection="balanced")
    epochs: int = 256  # epochs on the memory at each evaluation point
    max_lr: float = 0.05
    min_lr: float = 0.0005
    momentum: float = 0.9
    weight_decay: float = 1e-6
    clip_norm: float = 10.0

    def __post_init__(self):
        if self.memory.selection != "balanced":
            raise ValueError(
                "gdumb fills its memory with its class-balanced greedy sampler; set "
                f"memory.selection=balanced (got {self.memory.selection!r})."
            )
        if self.memory.per_class:
            raise ValueError(
                "gdumb balances memory.budget over the classes; set memory.per_class=0."
            )
        if self.epochs < 1 or not 0 < self.min_lr <= self.max_lr or self.clip_norm <= 0:
            raise ValueError(
                "method_args.epochs must be >= 1, 0 < min_lr <= max_lr and clip_norm > 0; got "
                f"{self.epochs}, {self.min_lr}, {self.max_lr}, {self.clip_norm}."
            )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        del info
        return PhaseSetup(train=False)  # nothing is learned from the stream

    def begin_phase(self, ctx: PhaseContext, variables, method_state: dict) -> dict:
        """Keeps the initial model, and the new classes' head columns as this phase starts them."""
        init = method_state.get("init")
        if init is None:
            init = snapshot(variables)
        else:
            head = fresh_head(init["params"]["head"], variables["params"]["head"], ctx.info.num_old)
            init = {**init, "params": {**init["params"], "head": head}}
        memory = method_state.get("memory")
        if memory is None:
            empty = jnp.full((self.memory.budget,), -1, jnp.int32)
            memory = {"indices": empty, "labels": empty}
        return {**method_state, "init": init, "memory": memory}

    def compress(self, ctx: PhaseContext, variables, method_state: dict):
        """The phase's stream into the memory, then a model trained from scratch on the memory."""
        info = ctx.info
        rng = np.random.default_rng([ctx.seed, info.phase, SEED])
        stream = rng.permutation(phase_data(ctx))
        memory = memory_lib.balanced_add(method_state["memory"], stream, ctx.y_train[stream], rng)
        rows = np.asarray(memory["indices"])
        rows = rows[rows >= 0]
        if ctx.fit is None or ctx.config is None:
            raise ValueError("GDumb trains through the phase context's `fit` service.")
        per_epoch = -(-len(rows) // ctx.config.train.batch_size)
        tx = optax.chain(
            optax.clip_by_global_norm(self.clip_norm),
            optax.add_decayed_weights(self.weight_decay),
            optax.sgd(warm_restarts(self.max_lr, self.min_lr, per_epoch), momentum=self.momentum),
        )
        init = method_state["init"]
        fresh = copy_tree({"batch_stats": {}, **init})  # `fit` donates what it trains
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(ctx.seed), info.phase), SEED)
        trained = ctx.fit(
            fresh,
            method=Method(),
            tx=tx,
            epochs=self.epochs,
            method_state={},
            rng=key,
            rows=rows,
            name=f"GDumb's training on its memory, phase {info.phase}",
        )
        del variables  # the stream trained nothing
        return trained, {**method_state, "memory": memory}
