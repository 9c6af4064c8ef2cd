"""Nearest class mean (NCM): a frozen feature extractor and one prototype per class.

The SimpleCIL baseline of Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained
Models: Generalizability and Adaptivity are All You Need" (prototype classifier on frozen features), with
the nearest-mean-of-exemplars rule of iCaRL (Rebuffi et al. 2017) applied to every training example of a
new class instead of a memory. Phase 0 trains the network as usual (SimpleCIL instead starts from a
pre-trained model: `train_first_phase=False`); later phases take no gradient step at all, so the
backbone, and with it every stored mean, stays valid. The head is widened as usual but never used.

Choices where implementations differ:
  * A class mean is the mean of the L2-normalised features of the class's training examples, then
    normalised again (iCaRL's NME); SimpleCIL averages raw features and compares them by cosine, which
    also ignores the mean's norm but weights long feature vectors more.
  * Scores are cosine similarities to the normalised means (monotone in the Euclidean distance between
    unit vectors, so the argmax is the nearest mean).
  * Every phase, phase 0 included, is evaluated with the nearest-mean rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from incremental import models
from incremental.methods.base import (
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
    PyTree,
    data_of_classes,
)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / ||x||` along `axis`; zero vectors stay zero."""
    norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
    return x / jnp.maximum(norm, 1e-12)


@jax.jit
def _sums_of_normalized(feats_NxD: jax.Array, onehot_NxK: jax.Array) -> jax.Array:
    return jnp.dot(onehot_NxK.T, l2_normalize(feats_NxD), precision=jax.lax.Precision.HIGHEST)


def class_counts(labels_N: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) examples per class; a ValueError unless every class in [0, num_classes) has
    some and no label lies outside."""
    counts = np.bincount(labels_N, minlength=num_classes)
    if len(counts) > num_classes or not counts.all():
        raise ValueError(
            f"Every class in [0, {num_classes}) needs training examples to have a mean; counts per "
            f"class: {counts.tolist()}. Check the dataset's class subset and the protocol."
        )
    return counts


def class_means(feats_NxD: np.ndarray, labels_N: np.ndarray, num_classes: int) -> jax.Array:
    """(num_classes, D) re-normalised means of the L2-normalised features of classes 0..num_classes-1."""
    counts = class_counts(labels_N, num_classes)
    onehot_NxK = jax.nn.one_hot(labels_N, num_classes, dtype=jnp.float32)
    sums_KxD = _sums_of_normalized(jnp.asarray(feats_NxD, jnp.float32), onehot_NxK)
    return l2_normalize(sums_KxD / jnp.asarray(counts, jnp.float32)[:, None])


@dataclasses.dataclass(frozen=True)
class NCM(Method):
    """Method state: `class_means` (head width, D), unit rows in class order (zero rows past the
    seen classes under `head.capacity`)."""

    name = "ncm"
    dynamic_phase = True

    train_first_phase: bool = True  # False: phase 0 takes no step either (for a pre-trained model)

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        del num_new
        if not known:
            return None
        return (
            "it keeps one normalised mean per class and no counts, so examples brought later "
            "cannot be folded into a known class's mean without its old data; bring examples of "
            "new classes only."
        )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0 and self.train_first_phase:
            return PhaseSetup()
        return PhaseSetup(train=False)

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        info = ctx.info
        idx = data_of_classes(ctx.y_train, info.num_old, info.num_seen)
        feats = ctx.embed(variables, ctx.x_train[idx])
        new = class_means(feats, ctx.y_train[idx] - info.num_old, info.num_new)
        if "class_means" in method_state:
            old = method_state["class_means"]
            if old.shape[0] < info.num_old:
                raise ValueError(
                    f"ncm holds {old.shape[0]} class means before phase {info.phase}, expected "
                    f"{info.num_old}; the method state does not belong to this run."
                )
            new = jnp.concatenate([old[: info.num_old], new])
        # A row per head column: the seen classes', or every class of a `head.capacity` head (zero
        # rows, masked in evaluation), so that evaluation compiles once.
        width = variables["params"]["head"]["kernel"].shape[-1]
        return {"class_means": jnp.pad(new, ((0, width - info.num_seen), (0, 0)))}

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        """Cosine similarity of each normalised feature to each class mean."""
        feats_BxD = l2_normalize(out.features.astype(jnp.float32))
        means_CxD = method_state["class_means"]
        zeros = jnp.zeros((means_CxD.shape[0],), jnp.float32)
        # In the head's blocks of columns (`models.head_logits`): exact at any number of rows.
        return models.head_logits(feats_BxD, {"kernel": means_CxD.T, "bias": zeros})
