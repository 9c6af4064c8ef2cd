"""MEMO: Memory-Efficient Expandable Model (Zhou, Wang, Ye and Zhan, ICLR 2023).

DER's growth, but only the deep layers are copied per phase: the shallow "generalized" layers
(`part='shallow'` of the backbone: ResNet-32's stem and first two stages, an MLP's layers but the
last) are shared by every branch, and each phase adds a copy of the deep "specialized" layers
(`part='deep'`: ResNet-32's third stage, an MLP's last layer). The shared layers train in phase 0
and are frozen after it unless `train_shared`; old deep branches are frozen; the auxiliary
classifier (new classes + one "old" class) and the exemplar memory are DER's.
"""

from __future__ import annotations

import dataclasses

from incremental.methods.base import PhaseInfo, PhaseSetup
from incremental.methods.der import DER
from incremental.models import Branches


@dataclasses.dataclass(frozen=True)
class MEMO(DER):
    name = "memo"
    train_shared: bool = False  # keep training the shared shallow layers after phase 0

    def branches(self, make, info: PhaseInfo) -> Branches:
        return Branches(
            make("deep"),
            num_branches=info.phase + 1,
            frozen=info.phase,
            shared=make("shallow"),
            freeze_shared=info.phase > 0 and not self.train_shared,
        )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        setup = super().setup(info)
        if info.phase == 0 or self.train_shared:
            return setup
        return dataclasses.replace(setup, freeze=(*setup.freeze, (r"backbone/shared/.*", True)))
