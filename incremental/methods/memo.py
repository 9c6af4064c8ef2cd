"""MEMO: Memory-Efficient Expandable Model (Zhou, Wang, Ye and Zhan, ICLR 2023).

DER's growth, but only the deep layers are copied per phase: the shallow "generalized" layers
(`part='shallow'` of the backbone: ResNet-32's stem and first two stages, an MLP's layers but the
last) are shared by every branch, and each phase adds a copy of the deep "specialized" layers
(`part='deep'`: ResNet-32's third stage, an MLP's last layer). Old deep branches are frozen; the
auxiliary classifier (new classes + one "old" class), the exemplar memory, the random old rows of a
new branch's head block and the weight aligning after each phase are DER's, as in PyCIL
(`utils/inc_net.py` `AdaptiveNet.update_fc` lines 796-820, `models/memo.py` lines 169-173, at
87cc4110d60765dc3f64af7ef7a693efed8418ff).

The shared layers keep training in every phase, BatchNorm in train mode (`train_shared=True`: PyCIL's
`exps/memo.json` line 12, `"train_base": true`, and `models/memo.py` lines 96-97); with
`train_shared=False` they train in phase 0 only and are frozen, BatchNorm included, after it.
"""

from __future__ import annotations

import dataclasses

from incremental.methods.base import PhaseInfo, PhaseSetup
from incremental.methods.der import DER
from incremental.models import Branches


@dataclasses.dataclass(frozen=True)
class MEMO(DER):
    name = "memo"
    train_shared: bool = True  # keep training the shared shallow layers after phase 0 (PyCIL)

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
