"""Replay (experience replay with an exemplar memory): train on the new classes' data plus the
exemplars kept from old classes, with plain cross-entropy over all seen classes.

PyCIL's `replay` baseline (herding memory of 2000 on CIFAR-100, reported last accuracy about 41 on
B0-Inc10); the linear head predicts, and NME accuracy is reported beside it.
"""

import dataclasses

from incremental.methods.rehearsal import Rehearsal


@dataclasses.dataclass(frozen=True)
class Replay(Rehearsal):
    name = "replay"
    dynamic_phase = True
    train_keys = ()  # plain cross-entropy
    eval_keys = ("class_means",)  # NME; the memory is the host's
