"""Joint: train on all the data of every class seen so far (the upper bound, "retrain from scratch").

The model is not re-initialised between phases (the widened network keeps training), as in PyCIL's
joint baseline; re-initialising would cost more and measure the same ceiling.
"""

import dataclasses

import numpy as np

from incremental.methods.base import Method, PhaseContext, phase_data


@dataclasses.dataclass(frozen=True)
class Joint(Method):
    name = "joint"
    dynamic_phase = True
    not_online = (
        "{name} trains every phase on the data of all phases so far; online, each example is "
        "seen once."
    )

    def train_indices(self, ctx: PhaseContext, method_state: dict) -> np.ndarray:
        del method_state
        return phase_data(ctx, so_far=True)
