"""EASE: Zhou et al. 2024, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning" (CVPR 2024; arXiv 2403.12030).

The pre-trained ViT is frozen. Each phase t adds a set of AdaptFormer adapters (`ViT(adapter=r)`,
one beside each block's MLP), trains it alone with a fresh cosine head over the phase's new classes,
then freezes it. Set k gives the ViT's [CLS] feature in subspace k; an image's feature is the
concatenation over the sets 0..t. Every class has a prototype in every subspace: the new classes the
mean of their training features in each one; an old class of phase i, which has none in a later
subspace j, gets one by semantic-guided prototype completion: with R the classes that arrived in
phase j or later (whose prototypes exist in subspaces i and j),

    sim = softmax_over_R(cos(P[c, i], P[r, i])),      P[c, j] = sum_r sim[c, r] P[r, j],

recomputed from the real prototypes every phase (`complete`). A class c of phase i scores
sum_j w_j cos(f_j, P[c, j]) over the subspaces, w_j = 1 for j = i and alpha / t otherwise
(subspace reweighting).

How it sits in this project: the backbone is `aper.AdapterBranches` over a ViT with t + 1 adapter
sets, `backbone/adapter/set_{k}/encoderblock_{i}/...`, beside the ViT's own parameters (which
`model.pretrained` fills; the adapters keep their initialisation). `grow` adds set t (initialised
as `models.vit.BlockAdapter` does), D zero rows to the head's kernel (the new subspace), and resets
the head's scale to 1: the phase's head is PILOT's fresh `proxy_fc`. The freeze rules train set t
alone of the backbone, the head's old columns are fixed, and the loss is the cross-entropy of the
cosine head on set t's features over the new classes. The training model computes set t only (the
other subspaces' features are zeros there); the phase's final model computes every set.

Defaults, from the reference code (sun-hailong/LAMDA-PILOT at 2647455):
  * adapter bottleneck 64 (`ffn_num`, exps/ease.json line 27), parallel, no LayerNorm, "lora"
    initialisation, scale 0.1 (utils/inc_net.py lines 174-182); a new set every phase, the old
    ones frozen (models/ease.py lines 44-47; backbone/vit_ease.py lines 278-302);
  * training: the current set only (backbone/vit_ease.py lines 304-328) with a new cosine head over
    the new classes (`proxy_fc`, utils/inc_net.py lines 1000-1006, 1026-1030), cross-entropy against
    `y - known` (models/ease.py lines 325-335);
  * prototypes: plain feature means of the new classes in every subspace (models/ease.py lines
    60-99); completion recomputed each phase (`recalc_sim` true, line 29 of exps/ease.json;
    `solve_sim_reset`, models/ease.py lines 176-226), no pre-trained subspace (`use_init_ptm`
    false, line 31), no old data (`use_old_data` false, line 33);
  * scores reweighted (`use_reweight` true, line 34) with alpha 0.1 (line 30):
    `EaseCosineLinear.forward_reweight` (backbone/linears.py lines 138-185), scale 1.
The optimiser is the run's (`config.train`, `config.train_first`); PILOT's is SGD with momentum
0.9, lr 0.025, batch 48, weight decay 5e-4, a cosine schedule to 0 over 20 epochs in every phase
(exps/ease.json lines 15-23; models/ease.py lines 272-279, 295-297).

Choices where implementations differ: the adapters have no dropout (PILOT's 0.1, backbone/vit_ease.py
line 290; this ViT has none). `reweight=False` scores the cosine of the whole concatenated feature to
the whole concatenated prototype, as PILOT's plain `fc` does. The training accuracy the step logs is
the head's on [zeros, ..., set t's features], not the loss's logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from incremental.methods.aper import (
    AdapterBranches,
    Aper,
    adapted_vit,
    adapter_rules,
    check_adapter,
)
from incremental.methods.base import (
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
    PyTree,
    phase_data,
)
from incremental.methods.l2p import masked_logits_problem
from incremental.methods.ncm import class_counts, l2_normalize
from incremental.models.vit import AdapterSet


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of `x` over their norms (PyTorch's `cosine_similarity` with its eps 1e-8)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def complete(protos_CxSxD: np.ndarray, class_phase_C: np.ndarray) -> np.ndarray:
    """Semantic-guided prototype completion: each class of phase i gets, in every later subspace j,
    the softmax(cosine in subspace i)-weighted sum of the subspace-j prototypes of the classes of
    phases >= j (PILOT's `solve_sim_reset`). The other prototypes are returned as given."""
    out = np.array(protos_CxSxD, np.float64)
    num_sets = out.shape[1]
    for i in range(num_sets - 1):
        own = class_phase_C == i
        for j in range(i + 1, num_sets):
            ref = class_phase_C >= j
            cosine = _unit(out[own, i]) @ _unit(out[ref, i]).T
            sim = np.exp(cosine - cosine.max(axis=1, keepdims=True))
            sim /= sim.sum(axis=1, keepdims=True)
            out[own, j] = sim @ out[ref, j]
    return out


def subspace_weights(class_phase_C: np.ndarray, num_sets: int, alpha: float) -> np.ndarray:
    """(C, S) weight of each subspace in each class's score: 1 in the class's own subspace,
    alpha / t in the others, t the last phase (`forward_reweight`)."""
    t = num_sets - 1
    own = np.arange(num_sets)[None, :] == class_phase_C[:, None]
    return np.where(own, 1.0, alpha / max(t, 1))


def new_prototypes(feats_NxF: np.ndarray, labels_N: np.ndarray, num_new: int) -> np.ndarray:
    """(num_new, F) mean features of classes 0..num_new-1; a ValueError if one has no example."""
    counts = class_counts(labels_N, num_new)
    sums = np.zeros((num_new, feats_NxF.shape[1]))
    np.add.at(sums, labels_N, feats_NxF)
    return sums / counts[:, None]


@dataclasses.dataclass(frozen=True)
class EASE(Method):
    """Method state: `prototypes` (seen classes, S * D), every class's prototype in each of the S
    subspaces (real or completed); `class_phase` (seen classes,) the phase each class arrived in;
    `subspace_weights` (seen classes, S). The adapters are in the params."""

    name = "ease"
    head = "cosine"
    train_keys = ()
    eval_keys = ("prototypes", "subspace_weights")

    bottleneck: int = 64  # adapter width r (PILOT `ffn_num`, exps/ease.json line 27)
    scale: float = 0.1  # adapter output scale (`ffn_adapter_scalar`, utils/inc_net.py line 180)
    alpha: float = 0.1  # weight of the other subspaces in a class's score (line 30)
    reweight: bool = True  # subspace reweighting (`use_reweight`, line 34)

    def __post_init__(self):
        check_adapter(self.name, self.bottleneck, self.scale)
        if self.alpha < 0:
            raise ValueError(f"ease: alpha must be >= 0, got {self.alpha}.")

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        return masked_logits_problem(self.name, num_new, known)

    def head_init(self, configured: str) -> str:
        del configured
        return "default"  # PILOT's fresh proxy head; zero columns would stay zero under a cosine

    def backbone(self, make: Callable, info: PhaseInfo, *, final: bool = False):
        num_sets = info.phase + 1
        vit = adapted_vit(make, self.name, self.bottleneck, num_sets, self.scale)
        return AdapterBranches(vit, tuple(range(num_sets)), live=None if final else info.phase)

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        return PhaseSetup(freeze=adapter_rules(info.phase), freeze_old_columns=True)

    def grow(self, ctx: PhaseContext, variables: PyTree, key: jax.Array) -> PyTree:
        """A fresh adapter set for the phase, D zero head rows for its subspace, the scale at 1."""
        params = variables["params"]
        sets = dict(params["backbone"]["adapter"])
        if len(sets) != ctx.info.phase:
            raise ValueError(
                f"ease phase {ctx.info.phase} grows from {len(sets)} adapter sets, expected "
                f"{ctx.info.phase}; the variables do not belong to this run."
            )
        width = params["backbone"]["cls"].shape[-1]
        fresh = AdapterSet(self.bottleneck, len(sets["set_0"])).init(key, width)["params"]
        sets[f"set_{ctx.info.phase}"] = flax.core.unfreeze(fresh)
        head = params["head"]
        rows = jnp.zeros((width, head["kernel"].shape[1]), head["kernel"].dtype)
        head = {**head, "kernel": jnp.concatenate([head["kernel"], rows]), "sigma": jnp.float32(1)}
        backbone = {**params["backbone"], "adapter": sets}
        return {**variables, "params": {**params, "backbone": backbone, "head": head}}

    loss = Aper.loss  # the cosine head's cross-entropy on the live branch, new classes only

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        info = ctx.info
        num_sets = info.phase + 1
        idx = phase_data(ctx)
        feats = np.asarray(ctx.embed(variables, ctx.x_train[idx]), np.float64)
        width = feats.shape[1] // num_sets
        new = new_prototypes(feats, ctx.y_train[idx] - info.num_old, info.num_new)
        protos = np.zeros((info.num_seen, num_sets, width))
        protos[info.num_old :] = new.reshape(info.num_new, num_sets, width)
        class_phase = np.full((info.num_seen,), info.phase, np.int32)
        if info.num_old:
            old = np.asarray(method_state.get("prototypes", np.zeros((0, 0))), np.float64)
            if old.shape != (info.num_old, info.phase * width):
                raise ValueError(
                    f"ease holds prototypes of shape {old.shape} before phase {info.phase}, "
                    f"expected {(info.num_old, info.phase * width)}; the method state does not "
                    "belong to this run."
                )
            protos[: info.num_old, : info.phase] = old.reshape(info.num_old, info.phase, width)
            class_phase[: info.num_old] = np.asarray(method_state["class_phase"])
        protos = complete(protos, class_phase)
        weights = subspace_weights(class_phase, num_sets, self.alpha)
        return {
            "prototypes": jnp.asarray(protos.reshape(info.num_seen, -1), jnp.float32),
            "class_phase": jnp.asarray(class_phase),
            "subspace_weights": jnp.asarray(weights, jnp.float32),
        }

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        """Per class, the weighted sum over subspaces of the cosine of the image's feature to the
        class's prototype there; without `reweight`, the cosine of the whole vectors."""
        protos_CxF = method_state["prototypes"]
        feats_BxF = out.features.astype(jnp.float32)
        highest = jax.lax.Precision.HIGHEST
        if not self.reweight:
            return jnp.dot(l2_normalize(feats_BxF), l2_normalize(protos_CxF).T, precision=highest)
        weights_CxS = method_state["subspace_weights"]
        (c, s), b = weights_CxS.shape, feats_BxF.shape[0]
        feats_BxSxD = l2_normalize(feats_BxF.reshape(b, s, -1))
        protos_CxSxD = l2_normalize(protos_CxF.reshape(c, s, -1))
        cosine = jnp.einsum("bsd,csd->bcs", feats_BxSxD, protos_CxSxD, precision=highest)
        return jnp.einsum("bcs,cs->bc", cosine, weights_CxS, precision=highest)
