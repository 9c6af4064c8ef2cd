"""DER: Dynamically Expandable Representation (Yan, Xie and He, CVPR 2021).

Every phase adds a new feature extractor (a `models.Branches` branch, initialised as a copy of the
last one, as PyCIL does); the old extractors are frozen, BatchNorm included, and the features of all
extractors are concatenated. An auxiliary classifier on the new extractor's features alone separates
the new classes from one "old" class, so that the new extractor learns features the old ones lack;
it is dropped at the end of the phase. Training uses the exemplar memory (`config.memory`), and NME
is reported beside the linear head.

Following PyCIL (github.com/G-U-N/PyCIL at 87cc4110d60765dc3f64af7ef7a693efed8418ff):
- The head over the concatenation keeps its old block; the old classes' weights on the new features
  start random (`old_rows='random'`, PyCIL `utils/inc_net.py` `DERNet.update_fc` lines 361-367: a
  fresh `SimpleLinear`, kaiming-uniform with gain 1, i.e. U(-sqrt(3 / D), sqrt(3 / D)) over the new
  width D, of which only the old block is overwritten); `old_rows='zeros'` starts them at zero, which
  keeps the old logits exactly at the start of the phase.
- Weight aligning after the training of every phase > 0 (`weight_align=True`, PyCIL `models/der.py`
  lines 120-125 and `DERNet.weight_align`, `utils/inc_net.py` lines 397-405): the new classes'
  weight vectors are multiplied by gamma = mean norm of the old classes' / mean norm of the new
  classes', the bias left alone; before the memory is selected and the phase is evaluated, and the
  next phase grows from the aligned head.

The paper's channel-level masks and pruning are not implemented (PyCIL's DER does not prune either),
so the parameter count grows by one backbone per phase.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from incremental import surgery
from incremental.methods.base import (
    Batch,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
    check_choice,
)
from incremental.methods.rehearsal import Rehearsal
from incremental.methods.wa import align_gamma
from incremental.models import Branches, head_logits

OLD_ROWS = ("random", "zeros")
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
    weight_align: bool = True  # align the new classes' weight norms after each phase > 0 (PyCIL)
    old_rows: str = "random"  # the old classes' weights on a new branch's features: random | zeros

    def __post_init__(self):
        check_choice("old_rows", self.old_rows, OLD_ROWS)

    # Refused by `incremental learn` for a phase with no new classes:
    needs_new_classes = (
        "{name} adds a backbone branch and an auxiliary new-vs-old head for each phase's new "
        "classes, and there are none."
    )

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
        aux_key, rows_key = jax.random.split(key)
        if self.old_rows == "random":
            params = random_new_rows(params, dim, rows_key)
        init = jax.nn.initializers.lecun_normal()
        params[AUX] = {
            "kernel": init(aux_key, (dim, ctx.info.num_new + 1), jnp.float32),
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
        """Drops the auxiliary head and (phases > 0) aligns the new classes' weights."""
        params = {k: v for k, v in variables["params"].items() if k != AUX}
        if self.weight_align and ctx.info.num_old:
            params = {**params, "head": aligned(params["head"], ctx.info.num_old)}
        return {**variables, "params": params}, method_state


def random_new_rows(params, dim: int, key: jax.Array):
    """The head's last `dim` rows (a new branch's features) drawn as PyCIL's fresh `SimpleLinear`:
    U(-b, b) with b = sqrt(3 / D), D the head's input width (kaiming-uniform, gain 1)."""
    kernel = params["head"]["kernel"]
    bound = (3.0 / kernel.shape[0]) ** 0.5
    rows = jax.random.uniform(key, (dim, kernel.shape[1]), jnp.float32, -bound, bound)
    return {**params, "head": {**params["head"], "kernel": kernel.at[-dim:].set(rows)}}


def aligned(head: dict, num_old: int) -> dict:
    """Weight aligning (Zhao et al. 2020, as DER and MEMO use it in PyCIL): the new classes' kernel
    columns scaled by `wa.align_gamma` (old classes' mean column norm / new classes'); bias kept."""
    kernel = jnp.asarray(head["kernel"])
    return {**head, "kernel": kernel.at[:, num_old:].multiply(align_gamma(kernel, num_old))}
