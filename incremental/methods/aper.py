"""APER (ADAM): Zhou et al. 2024, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need" (IJCV 2024; arXiv 2303.07338), with adapters.

Phase 0 adapts the pre-trained ViT to the data with AdaptFormer adapters (`ViT(adapter=r)`, one
bottleneck beside each block's MLP) and a cosine head, the ViT itself frozen; then everything is
frozen for good. The features are the concatenation [pre-trained [CLS], adapted [CLS]] of the same
ViT run without and with its adapters, and the classifier is SimpleCIL's: each class's prototype,
the mean of its training features, scored by cosine (`simplecil`, whose `end_phase` and `predict`
this method inherits). With `train_first_phase=False` nothing trains and the adapted features equal
the pre-trained ones (the up-projections start at zero).

How it sits in this project: the backbone is `AdapterBranches`, which shares the ViT's parameter
scope (as `l2p.PromptedViT` does), so the ViT keeps its paths and the adapters add
`backbone/adapter/set_0/encoderblock_{i}/...`; `model.pretrained` fills the ViT's part only
(`phase.pretrained.VIT_PARTS`), the adapters keep their initialisation. Phase 0 trains under the
freeze rules `backbone/adapter/.*` trainable, the rest of `backbone/.*` frozen; its training model
(`backbone(..., final=False)`) puts zeros where the frozen pre-trained features go, so the step does
not run the ViT twice, and the loss is the cross-entropy of PILOT's cosine head on the adapted
features alone (the head's rows for them, and its scale). The phase's final model, evaluated,
saved and carried, computes both halves.

Defaults, from the reference code (sun-hailong/LAMDA-PILOT at 2647455):
  * adapter bottleneck 64 (`ffn_num`, exps/aper_aperpter.json line 20: the file's name is spelled
    so), parallel to the MLP, no LayerNorm, "lora" initialisation, output scale 0.1 (utils/inc_net.py
    lines 70-77; backbone/vit_adapter.py lines 63-68, 165-183);
  * only the adapters and the head train (backbone/vit_adapter.py lines 404-409), in phase 0 only
    (models/aper_adapter.py lines 96-115), with the cross-entropy of a cosine head with a learned
    scale (`SimpleVitNet`'s `CosineLinear`, utils/inc_net.py lines 570-572; models/aper_adapter.py
    line 134);
  * features: [pre-trained, adapted] (`construct_dual_branch_network`, utils/inc_net.py lines
    706-716); prototypes: the plain feature means of the phase's training data in test mode
    (models/aper_adapter.py lines 39-64, 82), scored by `CosineLinear` (utils/inc_net.py line 678).
The optimiser is the run's (`config.train_first`); PILOT's is SGD with momentum 0.9, lr 0.01,
batch 48, weight decay 5e-4, a cosine schedule to 0 over 20 epochs (exps/aper_aperpter.json lines
15-21; models/aper_adapter.py lines 108, 111).

Choices where implementations differ: PILOT's adapters have a dropout of 0.1 in training
(backbone/vit_adapter.py line 159); this ViT has no dropout, so they have none. The training
accuracy the step logs is the head's on [zeros, adapted], not the loss's logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import Batch, Outputs, PhaseInfo, PhaseSetup, PyTree
from incremental.methods.simplecil import SimpleCIL


def adapter_rules(adapter_set: int) -> tuple[tuple[str, bool], ...]:
    """Freeze rules that train adapter set `adapter_set` alone of the backbone (first match)."""
    return ((rf"backbone/adapter/set_{adapter_set}/.*", False), ("backbone/.*", True))


class AdapterBranches(nn.Module):
    """The ViT's [CLS] feature once per branch, concatenated (B, len(branches) * D): a branch is an
    adapter set, or None for the pre-trained ViT without adapters. With `live` set, only branch
    `live` runs and the others give zeros (training, where they are frozen and unused)."""

    vit: nn.Module  # models.ViT with adapters
    branches: tuple[int | None, ...]
    live: int | None = None

    def setup(self):
        nn.share_scope(self, self.vit)  # the ViT's parameters keep their paths

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        run = [i for i in range(len(self.branches)) if self.live is None or i == self.live]
        feats = {i: self.vit(x, adapter_set=self.branches[i]) for i in run}
        zeros = jnp.zeros_like(feats[run[0]])
        return jnp.concatenate([feats.get(i, zeros) for i in range(len(self.branches))], -1)


def adapted_vit(make: Callable, method: str, bottleneck: int, sets: int, scale: float):
    """The config's ViT with `sets` adapter sets; a ValueError naming `method` for another model."""
    plain = make()
    if not isinstance(plain, models.ViT):
        raise ValueError(
            f"{method} adds adapters to a ViT's blocks; model.name must be 'vit', the backbone is "
            f"a {type(plain).__name__}."
        )
    return make(adapter=bottleneck, adapter_sets=sets, adapter_scale=scale)


def last_branch_ce(out: Outputs, batch: Batch, params: PyTree, info: PhaseInfo) -> jax.Array:
    """Cross-entropy of the cosine head on the last branch's features alone (its rows of the
    head's kernel, and its scale), over the phase's new classes (the old ones at -inf)."""
    width = params["backbone"]["cls"].shape[-1]
    head = params["head"]
    rows = {"kernel": head["kernel"][-width:], "sigma": head["sigma"]}
    logits = models.cosine_logits(out.features[:, -width:], rows)
    return models.cross_entropy(models.mask_old(logits, info.num_old), batch.y)


def check_adapter(method: str, bottleneck: int, scale: float) -> None:
    if bottleneck < 1:
        raise ValueError(f"{method}: bottleneck must be >= 1, got {bottleneck}.")
    if not scale > 0:
        raise ValueError(f"{method}: scale must be > 0, got {scale}.")


@dataclasses.dataclass(frozen=True)
class Aper(SimpleCIL):
    """Method state: SimpleCIL's prototypes of the [pre-trained, adapted] features; the adapters
    are in the params (`backbone/adapter/set_0/...`)."""

    name = "aper"
    head = "cosine"
    dynamic_phase = False  # the phase-0 training model differs from the final one

    bottleneck: int = 64  # adapter width r (PILOT `ffn_num`, exps/aper_aperpter.json line 20)
    scale: float = 0.1  # adapter output scale (`ffn_adapter_scalar`, utils/inc_net.py line 76)
    train_first_phase: bool = True  # adapt in phase 0; False: SimpleCIL on [f, f]

    def __post_init__(self):
        check_adapter(self.name, self.bottleneck, self.scale)

    def backbone(self, make: Callable, info: PhaseInfo, *, final: bool = False):
        vit = adapted_vit(make, self.name, self.bottleneck, 1, self.scale)
        training = info.phase == 0 and self.train_first_phase and not final
        return AdapterBranches(vit, (None, 0), live=1 if training else None)

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0 and self.train_first_phase:
            return PhaseSetup(freeze=adapter_rules(0))
        return PhaseSetup(train=False)

    def loss(
        self,
        out: Outputs,
        batch: Batch,
        *,
        params: PyTree,
        method_state: dict,
        info: PhaseInfo,
        apply_fn: Callable,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        del method_state, apply_fn
        ce = last_branch_ce(out, batch, params, info)
        return ce, {"ce": ce}
