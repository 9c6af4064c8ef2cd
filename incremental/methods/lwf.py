"""LwF: Li & Hoiem 2017, "Learning without Forgetting" (TPAMI), in its class-incremental form.

At the end of every phase the model is kept as a teacher. In later phases, on the new data only, the
loss is

    CE(new-class logits, y) + strength * KD(old-class logits, teacher's logits)

with the paper's distillation term: the cross-entropy between the teacher's and the student's softmax
at temperature T over the old classes, -sum_j softmax(t / T)_j log softmax(s / T)_j, with no T^2
factor. The teacher's logits are computed inside the step (BatchNorm in inference mode) and carry no
gradient.

Choices where implementations differ:
- Classification loss: the paper trains the new task's own output layer, which in one head is a
  softmax over this phase's classes only (`ce_classes='new'`); FACIL (no exemplars) and PyCIL do the
  same. `ce_classes='seen'` uses a softmax over all seen classes instead.
- Distillation: one softmax over all old classes (FACIL and PyCIL concatenate old heads the same way);
  the paper, with one head per task, distils each old task's head separately.
- Strength: the paper's lambda_o = 1, also FACIL's lamb; PyCIL uses 3. Temperature T = 2 (paper).
- Task scenario (`protocol.scenario='task'`): the loss sees every seen class's logits
  (`task_masked_loss = False`), since the distillation reads the old blocks on the new data; with
  `ce_classes='new'` its classification term is over the phase's own block, the task's head.
- Omitted: the paper's optional warm-up step (training only the new head first), which the paper
  reports matters little for LwF; FACIL and PyCIL also omit it by default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from incremental import models
from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    new_logits_problem,
)
from incremental.methods.distill import kd_loss, snapshot

PyTree = Any
CE_CLASSES = ("new", "seen")


@dataclasses.dataclass(frozen=True)
class LwF(Method):
    name = "lwf"
    dynamic_phase = True
    train_keys = ("teacher",)
    eval_keys = ()
    # The task scenario: its distillation reads the old blocks on the new data, and its
    # classification term with ce_classes='new' is over the phase's own block already.
    task_masked_loss = False

    strength: float = 1.0  # lambda_o of the paper (and FACIL's lamb); PyCIL uses 3
    temperature: float = 2.0  # T of the paper, FACIL and PyCIL
    ce_classes: str = "new"  # 'new': softmax over this phase's classes (paper) | 'seen': all seen

    def __post_init__(self):
        if self.ce_classes not in CE_CLASSES:
            raise ValueError(
                f"method_args.ce_classes must be one of {CE_CLASSES}, got {self.ce_classes!r}."
            )
        if self.temperature <= 0:
            raise ValueError(f"method_args.temperature must be > 0, got {self.temperature}.")
        if self.strength < 0:
            raise ValueError(f"method_args.strength must be >= 0, got {self.strength}.")

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        del known
        return new_logits_problem(num_new, "ce_classes", self.ce_classes)

    def scenario_problem(self, scenario: str) -> str | None:
        if scenario == "task" and self.ce_classes != "new":
            return (
                "in the task scenario its classification loss must be over the phase's own head "
                "block (it masks its own loss, to distil the old blocks); pass "
                "--config.method_args.ce_classes=new."
            )
        return super().scenario_problem(scenario)

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
        del params
        if "teacher" not in method_state:  # phase 0
            ce = models.cross_entropy(out.logits, batch.y)
            return ce, {"ce": ce}
        logits = out.logits
        if self.ce_classes == "new":  # the new classes' logits only, at any head width
            logits = models.mask_old(logits, info.num_old)
        ce = models.cross_entropy(logits, batch.y)
        _, teacher_logits = apply_fn(method_state["teacher"], batch.x, train=False)
        kd = kd_loss(out.logits, teacher_logits, self.temperature, info.num_old)
        return ce + self.strength * kd, {"ce": ce, "kd": kd}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        del ctx
        return {**method_state, "teacher": snapshot(variables)}
