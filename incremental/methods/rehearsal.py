"""What every rehearsal method shares: an exemplar memory, training on new data plus the memory, and
nearest-mean-of-exemplars (NME) evaluation beside the linear head.

After each phase (with the final model of the phase) the memory drops old exemplars down to the new
per-class count and selects the new classes' exemplars; the class means used by NME are the
normalised means of the exemplars' normalised features, recomputed for every seen class (iCaRL).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from incremental import memory as memory_lib
from incremental import models
from incremental.methods.base import Method, Outputs, PhaseContext, data_of_classes, phase_data
from incremental.protocol import scenario_of


def class_means(feats_NxD: jax.Array, labels_N: np.ndarray, num_classes: int) -> jax.Array:
    """(num_classes, D) normalised means of normalised features, per class."""
    onehot = jax.nn.one_hot(jnp.asarray(labels_N), num_classes, dtype=jnp.float32)
    sums = onehot.T @ models.unit(jnp.asarray(feats_NxD, jnp.float32))
    return models.unit(sums / onehot.sum(0)[:, None].clip(1.0))


def nme_scores(out: Outputs, method_state: dict) -> jax.Array:
    """Negative distance of the normalised features to each class mean (the NME classifier)."""
    feats = models.unit(out.features)
    means = method_state["class_means"]
    sq = (feats**2).sum(1, keepdims=True) - 2 * feats @ means.T + (means**2).sum(1)[None, :]
    return -jnp.sqrt(jnp.maximum(sq, 0.0))


def domain_memory(ctx: PhaseContext, variables, memory: dict, cfg: memory_lib.MemoryConfig):
    """The memory after a phase of the domain scenario, where every phase brings every class: each
    class's exemplars split evenly over the phases so far, `per_class // (phase + 1)` from each
    (its domain); the earlier phases' cut to their first ones (their priority order), this phase's
    selected from its own examples by the features of `variables`."""
    info = ctx.info
    share = max(1, cfg.per_class_count(info.num_seen) // (info.phase + 1))
    idx, labels = np.asarray(memory["indices"]), np.asarray(memory["labels"])
    group = ctx.arrival[idx] * info.num_seen + labels  # (phase, class)
    keep = np.zeros(len(idx), bool)
    for g in np.unique(group):
        keep[np.flatnonzero(group == g)[:share]] = True
    new = phase_data(ctx)
    fresh = memory_lib.update(
        memory_lib.empty(),
        dataclasses.replace(cfg, per_class=share),
        new_indices=new,
        new_labels=ctx.y_train[new],
        feats_fn=lambda rows: ctx.embed(variables, ctx.x_train[rows]),
        num_seen=info.num_seen,
        seed=ctx.seed * 1000 + info.phase,
    )
    kept = {
        "indices": jnp.asarray(idx[keep], jnp.int32),
        "labels": jnp.asarray(labels[keep], jnp.int32),
    }
    return memory_lib.add(kept, np.asarray(fresh["indices"]), np.asarray(fresh["labels"]))


@dataclasses.dataclass(frozen=True)
class Rehearsal(Method):
    """Base for methods that keep exemplars; `config.memory` sets `memory`."""

    name = "rehearsal"
    memory: memory_lib.MemoryConfig = memory_lib.MemoryConfig()

    def init_state(self) -> dict:
        return {"memory": memory_lib.empty()}

    def train_indices(self, ctx: PhaseContext, method_state: dict) -> np.ndarray:
        new = phase_data(ctx)  # the new classes' examples, and those a learned phase brings
        return np.concatenate([new, np.asarray(method_state["memory"]["indices"], np.int64)])

    def next_memory(self, ctx: PhaseContext, variables, method_state: dict) -> dict:
        """The memory after this phase: old classes cut to the new per-class count, the new classes'
        exemplars selected by the features of `variables` (in the domain scenario, `domain_memory`)."""
        info = ctx.info
        if ctx.config is not None and scenario_of(ctx.config) == "domain":
            return domain_memory(ctx, variables, method_state["memory"], self.memory)
        new = data_of_classes(ctx.y_train, info.num_old, info.num_seen)
        return memory_lib.update(
            method_state["memory"],
            self.memory,
            new_indices=new,
            new_labels=ctx.y_train[new],
            feats_fn=lambda idx: ctx.embed(variables, ctx.x_train[idx]),
            num_seen=info.num_seen,
            seed=ctx.seed * 1000 + info.phase,
        )

    def end_phase(self, ctx: PhaseContext, variables, method_state: dict) -> dict:
        memory = self.next_memory(ctx, variables, method_state)
        idx = np.asarray(memory["indices"])
        feats = ctx.embed(variables, ctx.x_train[idx])
        # A mean per head column: num_seen, or every class of a `head.capacity` head (zero rows).
        width = variables["params"]["head"]["kernel"].shape[-1]
        means = class_means(feats, np.asarray(memory["labels"]), width)
        return {**method_state, "memory": memory, "class_means": means}

    def extra_predictions(self) -> dict[str, Callable]:
        return {"nme": nme_scores}
