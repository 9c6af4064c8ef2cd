"""Freeze the backbone: after phase 0 the feature extractor is fixed; a widened head is trained on the
data of all classes seen so far (old and new), so only the linear classifier adapts.
"""

import dataclasses

import numpy as np

from incremental.methods.base import Method, PhaseContext, PhaseInfo, PhaseSetup, phase_data


@dataclasses.dataclass(frozen=True)
class FreezeBackbone(Method):
    name = "freeze_backbone"
    dynamic_phase = True  # under head.capacity: two programs, phase 0's and the frozen backbone's

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0:
            return PhaseSetup()
        return PhaseSetup(freeze=(("backbone/.*", True),), train_batch_norm=False)

    def train_indices(self, ctx: PhaseContext, method_state: dict) -> np.ndarray:
        del method_state
        return phase_data(ctx, so_far=True)
