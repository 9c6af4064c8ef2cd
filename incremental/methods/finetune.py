"""Finetune: widen the head and train everything on the new classes' data only.

The lower bound of class-incremental learning: with no old data and nothing to hold the old classes in
place, the network forgets them (catastrophic forgetting, McCloskey & Cohen 1989).

`loss_classes='seen'` (default) is cross-entropy over every seen class's logit; `'new'` over the new
classes' logits only, as PyCIL's finetune (models/finetune.py line 153 at 87cc411) and FACIL train:
the old columns then get no gradient from the loss, and forget only through the shared backbone.
"""

from __future__ import annotations

import dataclasses

from incremental.methods.base import (
    LOSS_CLASSES,
    Batch,
    Method,
    Outputs,
    PhaseInfo,
    check_choice,
    classified_logits,
    new_logits_problem,
)


@dataclasses.dataclass(frozen=True)
class Finetune(Method):
    name = "finetune"
    dynamic_phase = True

    loss_classes: str = "seen"

    def __post_init__(self):
        check_choice("loss_classes", self.loss_classes, LOSS_CLASSES)

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        del known
        return new_logits_problem(num_new, "loss_classes", self.loss_classes)

    def loss(self, out: Outputs, batch: Batch, *, info: PhaseInfo, **kwargs):
        logits = classified_logits(out.logits, info.num_old, self.loss_classes)
        return super().loss(out._replace(logits=logits), batch, info=info, **kwargs)
