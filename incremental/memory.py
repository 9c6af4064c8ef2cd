"""Exemplar memory: which training examples of old classes a rehearsal method keeps.

The memory is a pytree of two int32 arrays, `indices` into the training set and their remapped
`labels`, grouped by class and, within a class, in priority order: reducing a class to `m` exemplars
keeps its first `m` (for herding, the greedy order of iCaRL, so the kept set is the best m-subset the
greedy rule would have chosen). It lives in the method state, so every checkpoint holds it.

Budget rules (`config.memory`):
  per_class > 0: that many exemplars for every seen class (FACIL's "20 per class").
  otherwise: a fixed total `budget` split evenly, `budget // num_seen` per class, shrinking as classes
  arrive (iCaRL; PyCIL's `fixed_memory: false`, 2000 for CIFAR-100).

The selections above choose a class's exemplars at its phase's end. The stream selections fill the
memory while the phase's examples arrive, one batch at a time, so that online learning (each example
seen once) can keep some: `reservoir` (Vitter's algorithm R, inside the jitted train step:
`stream_memory`, `reservoir_add`, `draw`) and `balanced` (GDumb's class-balanced greedy sampler, on
the host: `balanced_add`). A stream memory keeps the stored inputs themselves (the train step sees
the phase's arrays, not the whole training set), their labels and, for DER++, their logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SELECTIONS = ("herding", "random", "closest_to_mean", "reservoir", "balanced")
STREAM_SELECTIONS = ("reservoir", "balanced")  # filled as the stream arrives, not at phase ends


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    budget: int = 2000  # total exemplars, split evenly over seen classes (iCaRL / PyCIL)
    per_class: int = 0  # > 0: a fixed number per class instead of the total budget
    selection: str = "herding"  # herding | random | closest_to_mean | reservoir | balanced

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(
                f"Unknown memory.selection {self.selection!r}; choose one of {SELECTIONS}."
            )
        if self.per_class < 0 or self.budget < 0:
            raise ValueError("memory.budget and memory.per_class must be >= 0.")
        if self.per_class == 0 and self.budget == 0:
            raise ValueError(
                "This method keeps exemplars: set memory.budget (e.g. 2000) or memory.per_class."
            )

    def per_class_count(self, num_seen: int) -> int:
        """Exemplars per class once `num_seen` classes have been learned."""
        if self.per_class:
            return self.per_class
        count = self.budget // num_seen
        if count == 0:
            raise ValueError(
                f"memory.budget={self.budget} is smaller than the {num_seen} classes seen; "
                "raise the budget or use memory.per_class."
            )
        return count


def empty() -> dict:
    return {"indices": jnp.zeros((0,), jnp.int32), "labels": jnp.zeros((0,), jnp.int32)}


def counts(memory: dict, num_classes: int) -> np.ndarray:
    """Number of exemplars held for each class."""
    return np.bincount(np.asarray(memory["labels"]), minlength=num_classes)


def reduce(memory: dict, per_class: int) -> dict:
    """Keeps the first `per_class` exemplars of every class (their priority order)."""
    labels = np.asarray(memory["labels"])
    keep = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return {k: jnp.asarray(np.asarray(v)[keep]) for k, v in memory.items()}


def add(memory: dict, indices: np.ndarray, labels: np.ndarray) -> dict:
    return {
        "indices": jnp.concatenate([memory["indices"], jnp.asarray(indices, jnp.int32)]),
        "labels": jnp.concatenate([memory["labels"], jnp.asarray(labels, jnp.int32)]),
    }


def _bucket(n: int) -> int:
    """Pads sizes to a few shapes so herding compiles a handful of times, not once per class."""
    return max(16, 1 << (n - 1).bit_length())


@jax.jit
def _herding(feats_NxD: jax.Array, valid_N: jax.Array, m: jax.Array) -> jax.Array:
    """The first `m` picks (a number the program takes, not one it is compiled for) in an array of
    N, the rest zeros."""
    feats = feats_NxD / jnp.linalg.norm(feats_NxD, axis=1, keepdims=True).clip(1e-12)
    feats = jnp.where(valid_N[:, None], feats, 0.0)
    mean_D = feats.sum(0) / valid_N.sum()

    def pick(k, carry):
        chosen, running_D, taken_N = carry
        # Distance from the class mean of the mean of the exemplars with candidate i added.
        dist = jnp.linalg.norm(mean_D[None, :] - (running_D[None, :] + feats) / (k + 1), axis=1)
        dist = jnp.where(taken_N | ~valid_N, jnp.inf, dist)
        best = jnp.argmin(dist)
        return chosen.at[k].set(best), running_D + feats[best], taken_N.at[best].set(True)

    init = (jnp.zeros(valid_N.shape, jnp.int32), jnp.zeros_like(mean_D), jnp.zeros_like(valid_N))
    return jax.lax.fori_loop(0, m, pick, init)[0]


def herding(feats_NxD: np.ndarray, m: int) -> np.ndarray:
    """iCaRL's herding: greedily pick exemplars whose running mean best matches the class mean.

    Works on L2-normalised features; returns `min(m, N)` row indices in pick order.
    """
    n = len(feats_NxD)
    m = min(m, n)
    size = _bucket(n)
    padded = np.zeros((size, feats_NxD.shape[1]), np.float32)
    padded[:n] = feats_NxD
    order = _herding(jnp.asarray(padded), jnp.arange(size) < n, jnp.int32(m))
    return np.asarray(order)[:m]


def closest_to_mean(feats_NxD: np.ndarray, m: int) -> np.ndarray:
    """The `m` examples whose normalised features are nearest the class mean, nearest first."""
    feats = feats_NxD / np.linalg.norm(feats_NxD, axis=1, keepdims=True).clip(1e-12)
    dist = np.linalg.norm(feats - feats.mean(0, keepdims=True), axis=1)
    return np.argsort(dist, kind="stable")[: min(m, len(feats))]


def select(
    selection: str, feats_NxD: np.ndarray | None, m: int, rng: np.random.Generator
) -> np.ndarray:
    """Row indices of the chosen exemplars of one class, in priority order."""
    if selection == "random":
        n = len(feats_NxD)
        return rng.permutation(n)[: min(m, n)]
    if selection == "closest_to_mean":
        return closest_to_mean(feats_NxD, m)
    return herding(feats_NxD, m)


def update(
    memory: dict,
    cfg: MemoryConfig,
    *,
    new_indices: np.ndarray,
    new_labels: np.ndarray,
    feats_fn,
    num_seen: int,
    seed: int,
) -> dict:
    """Shrinks old classes to the new per-class count and adds exemplars of the new classes.

    Args:
      memory: the current memory.
      cfg: the budget rule and selection.
      new_indices, new_labels: training indices and remapped labels of this phase's classes.
      feats_fn: indices -> (N, D) features with the current model (unused by `random`).
      num_seen: classes learned including this phase.
      seed: seed for `random` selection (the run seed and phase).
    """
    if cfg.selection in STREAM_SELECTIONS:
        raise ValueError(
            f"memory.selection={cfg.selection!r} fills a memory while the stream arrives; this "
            "method picks its exemplars at phase ends: use herding, random or closest_to_mean."
        )
    m = cfg.per_class_count(num_seen)
    memory = reduce(memory, m)
    rng = np.random.default_rng(seed)
    for c in np.unique(new_labels):
        idx = new_indices[new_labels == c]
        # Random selection needs only the count, not features.
        random = cfg.selection == "random"
        feats = np.zeros((len(idx), 1), np.float32) if random else feats_fn(idx)
        chosen = idx[select(cfg.selection, feats, m, rng)]
        memory = add(memory, chosen, np.full(len(chosen), c))
    return memory


def stream_memory(size: int, example: np.ndarray, num_logits: int = 0) -> dict:
    """An empty stream memory of `size` slots for stored inputs shaped and typed like `example`.

    `labels` is -1 in empty slots; `logits` (size, num_logits) are the logits each example had when
    it was stored (DER++) and `logit_cols` how many classes the head had then; `seen` counts the
    examples offered so far (algorithm R's t).
    """
    example = np.asarray(example)
    return {
        "x": jnp.zeros((size, *example.shape), jnp.asarray(example).dtype),
        "labels": jnp.full((size,), -1, jnp.int32),
        "logits": jnp.zeros((size, num_logits), jnp.float32),
        "logit_cols": jnp.zeros((size,), jnp.int32),
        "seen": jnp.zeros((), jnp.int32),
    }


def widen_logits(memory: dict, width: int) -> dict:
    """The memory with room for `width` logits per example (the head widened); new columns zero."""
    extra = width - memory["logits"].shape[1]
    if extra <= 0 or memory["logits"].shape[1] == 0:
        return memory
    return {**memory, "logits": jnp.pad(memory["logits"], ((0, 0), (0, extra)))}


def reservoir_add(
    memory: dict,
    x: jax.Array,
    y: jax.Array,
    weight: jax.Array,
    key: jax.Array,
    logits: jax.Array | None = None,
) -> dict:
    """Algorithm R (Vitter 1985) over one batch: each example of weight > 0, in order, is offered.

    The t-th example offered goes to slot t - 1 while the memory has room, else to a slot drawn
    uniformly from [0, t) when that slot exists (< size): after T offers, each of them is in the
    memory with probability size / T. When two examples of a batch draw the same slot the later one
    wins, as in the sequential algorithm. Traceable; `key` makes it deterministic. `logits` (the
    batch's, from the forward pass before the update) are kept where finite: a `head.capacity`
    head's classes not seen yet are -inf, and `logit_cols` counts the others.
    """
    size = memory["labels"].shape[0]
    real = weight > 0
    t = memory["seen"] + jnp.cumsum(real.astype(jnp.int32))  # each example's 1-based offer number
    drawn = jax.random.randint(key, t.shape, 0, jnp.maximum(t, 1))
    slot = jnp.where(t <= size, t - 1, drawn)
    keep = real & (slot < size)
    order = jnp.arange(t.shape[0], dtype=jnp.int32)
    target = jnp.where(keep, slot, size)  # `size`: no slot
    last = jnp.full((size + 1,), -1, jnp.int32).at[target].max(order)
    slot = jnp.where(keep & (last[target] == order), slot, size)  # out of range: dropped

    def put(stored, values):
        return stored.at[slot].set(values.astype(stored.dtype), mode="drop")

    new = {
        **memory,
        "x": put(memory["x"], x),
        "labels": put(memory["labels"], y),
        "seen": memory["seen"] + real.sum(dtype=jnp.int32),
    }
    width = memory["logits"].shape[1]
    if width and logits is not None:
        valid = jnp.isfinite(logits)
        new["logits"] = put(memory["logits"], jnp.where(valid, logits, 0.0))
        new["logit_cols"] = put(memory["logit_cols"], valid.sum(-1, dtype=jnp.int32))
    return new


def draw(memory: dict, key: jax.Array, size: int) -> dict:
    """`min(size, slots)` slots of a stream memory drawn uniformly without replacement among the
    filled ones (Mammoth's `Buffer.get_data`); with fewer filled, the rest have weight 0.

    Returns the memory's per-slot fields at the drawn slots and their `weight`.
    """
    slots = memory["labels"].shape[0]
    filled = jnp.arange(slots) < jnp.minimum(memory["seen"], slots)  # algorithm R fills in order
    score = jnp.where(filled, jax.random.uniform(key, (slots,)), -1.0)
    top, picked = jax.lax.top_k(score, min(size, slots))
    drawn = {k: v[picked] for k, v in memory.items() if k != "seen"}
    return {**drawn, "weight": (top >= 0).astype(jnp.float32)}


def balanced_add(
    memory: dict, new_indices: np.ndarray, new_labels: np.ndarray, rng: np.random.Generator
) -> dict:
    """GDumb's greedy class-balanced sampler (Prabhu et al. 2020, section 3) over a stream, on the host.

    `memory` holds `indices` and `labels` (-1 in empty slots). Each example of the stream, in order,
    is stored while there is room; once the memory is full it is stored only if its class holds
    fewer than size / (classes seen so far) examples, in place of a random example of the largest
    class (the lowest label among equally large ones).
    """
    indices, labels = np.array(memory["indices"]), np.array(memory["labels"])
    size = len(labels)
    classes, held = np.unique(labels[labels >= 0], return_counts=True)
    counts = dict(zip(classes.tolist(), held.tolist(), strict=True))
    filled = int(held.sum())
    for index, label in zip(new_indices.tolist(), new_labels.tolist(), strict=True):
        counts.setdefault(label, 0)
        if filled < size:
            slot, filled = filled, filled + 1
        elif counts[label] < size / len(counts):
            largest = max(sorted(counts), key=lambda c: counts[c])
            slot = int(rng.choice(np.flatnonzero(labels == largest)))
            counts[largest] -= 1
        else:
            continue
        indices[slot], labels[slot] = index, label
        counts[label] += 1
    return {"indices": jnp.asarray(indices, jnp.int32), "labels": jnp.asarray(labels, jnp.int32)}
