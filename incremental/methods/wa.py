"""WA: Zhao, Xiao, Gan, Zhang & Xia 2020, "Maintaining Discrimination and Fairness in Class Incremental
Learning" (CVPR).

A rehearsal method (exemplar memory, NME reported beside the head) with two additions:

- Distillation from the previous phase's model (the teacher: snapshot at the end of each phase,
  BatchNorm in inference mode, no gradient), on the new data plus the memory:
      (1 - lambda) * CE(all seen classes) + lambda * KD(old classes),   lambda = num_old / num_seen,
  KD = -sum_{c<old} softmax(t / T)_c log softmax(z_c / T), T = 2 (no T^2 factor). Phase 0 is plain CE.
- Weight aligning after every phase > 0: the new classes' head weight vectors (kernel columns) are
  multiplied by gamma = mean_{c old} |w_c| / mean_{c new} |w_c|, so that both groups have the same
  mean norm. The head bias is left as trained, neither aligned nor clipped: PyCIL's `weight_align`
  rescales only `fc.weight` of a head that has a bias, and the paper's analysis is of the weights.
- Weight clipping (the paper's constraint, so that the weights aligned are non-negative like the
  ReLU features they multiply): after every optimizer step of every phase the head kernel is clipped
  at 0 (`post_update`; the kernel only: the bias and the backbone are not clipped).

How the alignment is carried, since a method hook cannot change the model's variables: the aligned
head is `kernel * scale` per column, with `scale` (num_seen,) in the method state (1 for phase 0's
classes, each later phase's gamma for its classes). `predict` uses the aligned head (kept in
`method_state["aligned_head"]`), the teacher is the model with the aligned head, and later phases
train the student through the same per-column scale, so every phase starts from, and distils, the
aligned model as in the paper and PyCIL. What differs from training the aligned weights themselves is
only the step size of the old columns, scaled by `scale**2` (SGD on w with w_aligned = scale * w).

Reported: `accuracy` and the matrices are those of the aligned head, as in the paper and in PyCIL,
whose `models/wa.py` aligns right after training (lines 106-112 at
87cc4110d60765dc3f64af7ef7a693efed8418ff, and at its first commit 44cda2e, lines 78-82), before the
trainer evaluates; its second alignment in `after_task` (line 40) finds gamma = 1. The head before
the phase's alignment is reported beside it under `unaligned_*` keys (`unaligned_accuracy_matrix`,
...), and NME under `nme_*`.

Choices where the paper and PyCIL (`models/wa.py`) differ:
- Distillation weight: the paper's (1 - lambda) * CE + lambda * KD with lambda = num_old / num_seen
  (as BiC; `kd_weighting='adaptive'`), which is also PyCIL's since commit 716625e (2023-02-16, "add
  kd_lambda", line 178). Before it, when PyCIL's published WA figures were made, PyCIL used
  CE + 2 * KD (44cda2e line 133; `kd_weighting='fixed'`, `kd_strength=2`).
- Clipping: the paper clips; PyCIL does not (`clip_weights=False`).
- Optimisation lives in the config: PyCIL trains 200 epochs (lr 0.1, milestones 60, 120, 170,
  weight decay 5e-4) in phase 0 and 170 epochs (lr 0.1, milestones 60, 100, 140, weight decay 2e-4)
  later, batch 128, memory 2000 on CIFAR-100.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import Batch, Outputs, PhaseContext, PhaseInfo
from incremental.methods.distill import kd_loss, old_share, snapshot
from incremental.methods.rehearsal import Rehearsal
from incremental.models import head_logits

PyTree = Any
KD_WEIGHTINGS = ("adaptive", "fixed")


def align_gamma(kernel_DxC: jax.Array, num_old: int) -> jax.Array:
    """gamma = mean norm of the old classes' weight vectors / mean norm of the new classes'."""
    norms_C = jnp.linalg.norm(kernel_DxC, axis=0)
    return norms_C[:num_old].mean() / jnp.maximum(norms_C[num_old:].mean(), 1e-12)


def scaled_head(head: dict, scale_C: jax.Array) -> dict:
    """The head whose kernel columns are multiplied by `scale_C` (the bias unchanged)."""
    return {**head, "kernel": head["kernel"] * scale_C[None, :]}


@dataclasses.dataclass(frozen=True)
class WA(Rehearsal):
    """Exemplars, distillation, non-negative head weights, and weight aligning after each phase."""

    name = "wa"
    dynamic_phase = True
    train_keys = ("teacher", "scale")
    eval_keys = ("class_means", "aligned_head", "unaligned_head")

    temperature: float = 2.0  # T of the distillation (paper, PyCIL)
    kd_weighting: str = (
        "adaptive"  # paper: (1-lambda) CE + lambda KD | 'fixed': CE + kd_strength KD
    )
    kd_strength: float = 2.0  # the KD weight of kd_weighting='fixed' (PyCIL)
    clip_weights: bool = True  # clip the head kernel at 0 after each step (paper; PyCIL: no)

    def __post_init__(self):
        if self.kd_weighting not in KD_WEIGHTINGS:
            raise ValueError(
                f"method_args.kd_weighting must be one of {KD_WEIGHTINGS}, got {self.kd_weighting!r}."
            )
        if self.temperature <= 0:
            raise ValueError(f"method_args.temperature must be > 0, got {self.temperature}.")
        if self.kd_strength < 0:
            raise ValueError(f"method_args.kd_strength must be >= 0, got {self.kd_strength}.")

    # Refused by `incremental learn` for a phase with no new classes:
    needs_new_classes = (
        "weight aligning rescales the new classes' head columns, and there are none."
    )
    not_task_incremental = (
        "weight aligning corrects the new classes' bias over the old ones in one head; with the "
        "task label they never compete, so there is nothing to correct."
    )

    def init_state(self) -> dict:
        return {**super().init_state(), "scale": jnp.zeros((0,), jnp.float32)}

    def begin_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        """New classes start with scale 1: their columns are trained as they are.

        `scale` has a value per head column: the seen classes', or every class of a
        `head.capacity` head (1 from `num_old` on)."""
        info = ctx.info
        scale = method_state["scale"]
        width = variables["params"]["head"]["kernel"].shape[-1]
        if scale.shape[0] not in (info.num_old, width):
            raise ValueError(
                f"WA's method state has weight scales for {scale.shape[0]} classes at the start of "
                f"phase {info.phase}, which follows {info.num_old}; resume from a checkpoint written "
                "by wa with the same protocol."
            )
        if info.num_old and "teacher" not in method_state:
            raise ValueError(
                f"WA phase {info.phase} has no teacher in its method state; start the run from "
                "phase 0 or resume from a checkpoint written by wa."
            )
        ones = jnp.ones((width - info.num_old,), jnp.float32)
        return {**method_state, "scale": jnp.concatenate([scale[: info.num_old], ones])}

    def loss(
        self,
        out: Outputs,
        batch: Batch,
        *,
        params: PyTree,
        method_state: dict,
        info: PhaseInfo,
        apply_fn: Callable,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = head_logits(out.features, scaled_head(params["head"], method_state["scale"]))
        logits = models.mask_unseen(logits, info.num_seen)  # a `head.capacity` head's unseen
        ce = models.cross_entropy(logits, batch.y)
        if "teacher" not in method_state:  # phase 0
            return ce, {"ce": ce}
        _, teacher_logits = apply_fn(method_state["teacher"], batch.x, train=False)
        kd = kd_loss(logits, teacher_logits.astype(jnp.float32), self.temperature, info.num_old)
        if self.kd_weighting == "fixed":
            return ce + self.kd_strength * kd, {"ce": ce, "kd": kd}
        lam, one_minus_lam = old_share(info.num_old, info.num_new)
        return one_minus_lam * ce + lam * kd, {"ce": ce, "kd": kd}

    def post_update(self, params: PyTree) -> PyTree:
        """The paper's clipping: the head kernel is kept non-negative (bias and backbone are not)."""
        if not self.clip_weights:
            return params
        head = params["head"]
        return {**params, "head": {**head, "kernel": jnp.maximum(head["kernel"], 0.0)}}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        """Aligns the new classes' weights (phases > 0); the aligned model predicts and teaches."""
        info = ctx.info
        scale = method_state["scale"]
        teacher = snapshot(variables)
        head = teacher["params"]["head"]
        if info.num_old:
            kernel = (head["kernel"] * scale[None, :])[:, : info.num_seen]
            scale = scale.at[info.num_old : info.num_seen].multiply(
                align_gamma(kernel, info.num_old)
            )
        unaligned = scaled_head(head, method_state["scale"])
        head = scaled_head(head, scale)
        teacher["params"] = {**teacher["params"], "head": head}
        method_state = super().end_phase(ctx, variables, method_state)
        return {
            **method_state,
            "scale": scale,
            "aligned_head": head,
            "unaligned_head": unaligned,
            "teacher": teacher,
        }

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        return head_logits(out.features, method_state["aligned_head"])

    def extra_predictions(self) -> dict[str, Callable]:
        """Beside the aligned head (`accuracy`, ...) and NME: the head before this phase's alignment
        (`unaligned_accuracy`, ...), what the phase's training alone gives."""
        return {**super().extra_predictions(), "unaligned": unaligned_scores}


def unaligned_scores(out: Outputs, method_state: dict) -> jax.Array:
    return head_logits(out.features, method_state["unaligned_head"])
