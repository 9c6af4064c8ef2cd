"""Finetune: widen the head and train everything on the new classes' data only.

The lower bound of class-incremental learning: with no old data and nothing to hold the old classes in
place, the network forgets them (catastrophic forgetting, McCloskey & Cohen 1989).
"""

import dataclasses

from incremental.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Finetune(Method):
    name = "finetune"
    dynamic_phase = True
