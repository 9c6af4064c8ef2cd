"""DER: Dynamically Expandable Representation (Yan, Xie and He, CVPR 2021).

Every phase adds a new feature extractor (a `models.Branches` branch, initialised as a copy of the
last one, as PyCIL does); the old extractors are frozen, BatchNorm included, and the features of all
extractors are concatenated. The head over the concatenation keeps its old weights and gets zero
rows for the new features and new columns for the new classes. An auxiliary classifier on the new
extractor's features alone separates the new classes from one "old" class, so that the new
extractor learns features the old ones lack; it is dropped at the end of the phase. Training uses
the exemplar memory (`config.memory`), and NME is reported beside the linear head.

The paper's channel-level masks and pruning are not implemented (PyCIL's DER does not prune either),
so the parameter count grows by one backbone per phase. PyCIL's weight aligning of the new columns
after each phase is not applied either.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from incremental import surgery
from incremental.methods.base import Batch, Outputs, PhaseContext, PhaseInfo, PhaseSetup
from incremental.methods.rehearsal import Rehearsal
from incremental.models import Branches, head_logits

AUX = "aux"  # the auxiliary head's params: {'kernel': (D, num_new + 1), 'bias': (num_new + 1,)}


def branch_count(params) -> int:
    return len([k for k in params["backbone"] if k.startswith("branch_")])


def copy_last_branch(tree: dict) -> dict:
    """Adds `branch_k`, a copy of the last branch, under `tree['backbone']` (batch statistics)."""
    if not tree:
        return tree
    branches = tree["backbone"]
    k = len([name for name in branches if name.startswith("branch_")])
    new = jax.tree.map(lambda x: jnp.array(x, copy=True), branches[f"branch_{k - 1}"])
    return {**tree, "backbone": {**branches, f"branch_{k}": new}}


@dataclasses.dataclass(frozen=True)
class DER(Rehearsal):
    name = "der"
    aux_weight: float = 1.0  # weight of the auxiliary classifier's cross-entropy (PyCIL: 1)

    def branches(self, make, info: PhaseInfo) -> Branches:
        return Branches(make(), num_branches=info.phase + 1, frozen=info.phase)

    def backbone(self, make, info: PhaseInfo, *, final: bool = False):
        del final
        return self.branches(make, info)

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0:
            return PhaseSetup()
        old = "|".join(str(i) for i in range(info.phase))
        return PhaseSetup(freeze=((rf"backbone/branch_({old})/.*", True),))

    def grow(self, ctx: PhaseContext, variables, key: jax.Array):
        params = variables["params"]
        dim = params["head"]["kernel"].shape[0] // branch_count(params)
        params = surgery.add_branch(params, feature_dim=dim)
        init = jax.nn.initializers.lecun_normal()
        params[AUX] = {
            "kernel": init(key, (dim, ctx.info.num_new + 1), jnp.float32),
            "bias": jnp.zeros((ctx.info.num_new + 1,), jnp.float32),
        }
        return {"params": params, "batch_stats": copy_last_branch(variables["batch_stats"])}

    def loss(self, out: Outputs, batch: Batch, *, params, method_state, info, apply_fn):
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch.y)
        if AUX not in params:
            return ce, {"ce": ce}
        dim = params[AUX]["kernel"].shape[0]
        aux_logits = head_logits(out.features[:, -dim:], params[AUX])
        aux_y = jnp.maximum(batch.y - info.num_old + 1, 0)  # old classes -> 0
        aux = optax.softmax_cross_entropy_with_integer_labels(aux_logits, aux_y)
        return ce + self.aux_weight * aux, {"ce": ce, "aux": aux}

    def compress(self, ctx: PhaseContext, variables, method_state: dict):
        params = {k: v for k, v in variables["params"].items() if k != AUX}
        return {**variables, "params": params}, method_state
