"""New head only: without old data, freeze the backbone and the old head columns after phase 0 and train
only the new classes' columns on the new data.

The old classes' logits are bit-identical to those after phase 0, so task-aware accuracy on old phases
cannot drop; class-incremental accuracy still suffers because the new columns are never calibrated
against the old ones.
"""

import dataclasses

from incremental.methods.base import Method, PhaseInfo, PhaseSetup


@dataclasses.dataclass(frozen=True)
class NewHeadOnly(Method):
    name = "new_head_only"
    dynamic_phase = True  # under head.capacity: phase 0's program and the frozen one's

    # Refused by `incremental learn` for a phase with no new classes:
    needs_new_classes = (
        "after phase 0 it trains only the new classes' head columns, and there are none."
    )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0:
            return PhaseSetup()
        return PhaseSetup(
            freeze=(("backbone/.*", True),), freeze_old_columns=True, train_batch_norm=False
        )
