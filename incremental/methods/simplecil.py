"""SimpleCIL: Zhou et al. 2023, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need" (IJCV 2024; arXiv 2303.07338).

The pre-trained backbone is never trained: no phase takes a gradient step (`PhaseSetup(train=False)`),
so the backbone after every phase is the one the run started from (`model.pretrained`). At the end of
each phase the classifier row of every new class is replaced by its prototype, the mean of the
class's training features, and a test image is scored by the cosine of its feature to each prototype.

Defaults and choices, from the reference code (sun-hailong/LAMDA-PILOT at 2647455):
  * No training: `"tuned_epoch": 0` (exps/simplecil.json line 15); the prototypes come from the
    frozen backbone's features of the phase's training data in test mode, no augmentation
    (models/simplecil.py lines 66-67, 79).
  * A prototype is the plain mean of the raw features, `embedding.mean(0)` (models/simplecil.py
    line 48), not the mean of normalised features as iCaRL's NME (`ncm`) takes it.
  * Scores are PILOT's `CosineLinear` over those rows, `normalize(f) @ normalize(proto)^T`
    (backbone/linears.py line 58; the network's fc, utils/inc_net.py line 571), times a scale σ = 1
    that does not change the argmax and is left out. The prototypes are stored normalised, so
    prediction is `ncm`'s (`NCM.predict`).
  * Old prototypes are kept as they are: the backbone does not move, so they stay exact. The
    method state keeps each class's feature sum and count too, so more examples of a known class
    (`incremental learn`) update its mean exactly.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from incremental.methods.base import PhaseContext, PyTree, phase_data
from incremental.methods.ncm import NCM, l2_normalize


@dataclasses.dataclass(frozen=True)
class SimpleCIL(NCM):
    """Method state: `class_means` (head width, D), the unit-norm prototypes in class order (zero rows
    past the seen classes under `head.capacity`), and the `class_sums` (head width, D) and
    `class_counts` (head width,) of the raw features they are the means of."""

    name = "simplecil"
    dynamic_phase = True
    train_keys = ()
    eval_keys = ("class_means",)

    train_first_phase: bool = False  # PILOT: tuned_epoch 0; True trains phase 0 as `ncm` does

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        del num_new, known
        return None  # sums and counts take more examples of a known class exactly

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        info = ctx.info
        idx = phase_data(ctx)  # the examples the phase brings
        feats = np.asarray(ctx.embed(variables, ctx.x_train[idx]), np.float64)
        width = variables["params"]["head"]["kernel"].shape[-1]
        sums = np.zeros((width, feats.shape[1]))
        counts = np.zeros((width,))
        if "class_sums" in method_state:
            old = np.asarray(method_state["class_sums"], np.float64)
            sums[: len(old)] = old
            counts[: len(old)] = np.asarray(method_state["class_counts"])
        np.add.at(sums, ctx.y_train[idx], feats)
        counts += np.bincount(ctx.y_train[idx], minlength=width)
        if not counts[: info.num_seen].all():
            raise ValueError(
                f"simplecil needs training examples of every seen class for its prototype; counts "
                f"per class: {counts[: info.num_seen].astype(int).tolist()}. Check the dataset's "
                "class subset and the protocol (or the method state belongs to another run)."
            )
        means = sums / np.maximum(counts, 1.0)[:, None]  # zero rows past the seen classes
        return {
            "class_means": l2_normalize(jnp.asarray(means, jnp.float32)),
            "class_sums": jnp.asarray(sums, jnp.float32),
            "class_counts": jnp.asarray(counts, jnp.float32),
        }
