"""LUCIR: Hou, Pan, Loy, Wang & Lin 2019, "Learning a Unified Classifier Incrementally via
Rebalancing" (CVPR).

A rehearsal method (exemplar memory, NME reported beside the head) with three changes to training:

- Cosine normalisation: the head scores `sigma * cos(f(x), w_c)` (`head = "cosine"`, the model's
  `CosineHead`), with one learnable scale `sigma` shared by all classes, initialised to 1 and carried
  across phases (official code and FACIL).
- Less-forget constraint (Eq. 6): `lambda * (1 - cos(f(x), f*(x)))` on every training example, with
  `f*` the features of the previous phase's final model (the teacher, BatchNorm in inference mode)
  and the adaptive weight of Eq. 7, `lambda = lambda_base * sqrt(num_old / num_new)`. That ratio is
  what the official code and FACIL compute.
- Inter-class separation (margin ranking, Eq. 8): for each example of an old class, its cosine score
  (without sigma) for its own class should exceed each of the `top_k` highest new-class cosine scores
  by `margin`: `relu(margin - cos_gt + cos_hard)`, averaged over the old-class examples of the batch
  and their `top_k` negatives (PyTorch's MarginRankingLoss over the hard pairs, as in the official
  code), times `lambda_mr`.

The total is `CE(sigma * cos, y) + less_forget + margin_ranking` over all seen classes; phase 0 is
plain cross-entropy. While the less-forget constraint is on, the old classes' head columns are frozen
(learning rate and weight decay 0), as in the official code and FACIL (`freeze_old_columns`).

Choices where the paper, its official code (hshustc/CVPR19_Incremental_Learning) and FACIL
(`lucir.py`) differ, or where this code departs from them (PyCIL has no LUCIR at 87cc411):
- New-class weights: imprinted (`imprint=True`, while `head.init` is 'default'), as the official
  CIFAR-100 script does (`--imprint_weights`): the normalised mean of the new classes' normalised
  features (`phase.begin.widen` with a cosine head). FACIL draws them at random, noting it makes no
  significant difference (src/approach/lucir.py lines 115-116 at e09d2c8); `imprint=False` does too.
- The last ReLU of the backbone is removed (`last_relu=False`: the backbones' option, here for the
  MLP, ConvNet and both ResNets), so that features and cosines can be negative: the paper's Sec. 4.1
  ("the ReLU in the penultimate layer is removed"), as FACIL does it (src/approach/lucir.py lines
  90-98 at e09d2c83320a1aa945a6157d4875437515824dc9, the last block of the ResNet's last stage
  without its ReLU). `last_relu=True` keeps it.
- `top_k` is capped at the number of new classes of the phase (PyTorch's `topk` would fail).
- Class-balanced finetuning (`class_balanced_finetune`, off by default as the official code's
  `--cb_finetune`, which only its ImageNet-Full script uses: imagenet-class-incremental/
  cbf_class_incremental_cosine_imagenet.py lines 96-105 and 562-659 at
  e5a90aed7640f3b00e5b1a8dfb5376c1628bfe6a, `ft_flag=2`): after training, in phases > 0, the head's
  old and new columns (not sigma) are trained on the exemplars of every seen class (the memory the
  phase ends with, selected by the trained model) with the phase's loss, the backbone and its
  BatchNorm statistics fixed: `cbf_epochs` 20, SGD at `cbf_lr` 0.01 divided by `train.lr_decay` at
  `cbf_milestones` (10), the run's momentum and weight decay, the training augmentation. FACIL and
  PyCIL have no such step.
- Memory: the paper keeps 20 exemplars per class (`--config.memory.per_class=20`); the run config's
  memory (a fixed total by default) is used as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import models, surgery
from incremental.methods.base import (
    Batch,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
)
from incremental.methods.distill import copy_tree, snapshot
from incremental.methods.rehearsal import Rehearsal

PyTree = Any


def adaptive_lambda(
    lambda_base: float, num_old: int | jax.Array, num_new: int | jax.Array
) -> jax.Array:
    """Eq. 7: the less-forget weight grows with the ratio of old to new classes (float32).

    The counts are Python numbers when the head widens every phase and traced under
    `head.capacity`; behind an optimisation barrier both are runtime values (`distill.old_share`).
    """
    old, new = jax.lax.optimization_barrier(
        (jnp.asarray(num_old, jnp.float32), jnp.asarray(num_new, jnp.float32))
    )
    return lambda_base * jnp.sqrt(old / new)


def less_forget_loss(feats_BxD: jax.Array, teacher_feats_BxD: jax.Array) -> jax.Array:
    """Eq. 6 per example: 1 - cos(f(x), f*(x)); the teacher's features carry no gradient."""
    teacher = jax.lax.stop_gradient(models.unit(teacher_feats_BxD))
    return 1.0 - (models.unit(feats_BxD) * teacher).sum(-1)


def margin_ranking_loss(
    cos_BxC: jax.Array,
    y_B: jax.Array,
    weight_B: jax.Array,
    *,
    num_old: int | jax.Array,
    num_seen: int | jax.Array,
    top_k: int,
    margin: float,
) -> jax.Array:
    """Eq. 8 per example, scaled so that its weighted batch mean is the mean over hard pairs.

    For an example of an old class (`y < num_old`), each of the `top_k` highest new-class cosines
    (columns `num_old` to `num_seen`; at most as many as there are new classes, since PyTorch's
    `topk` would fail) gives a pair `relu(margin - cos_gt + cos_hard)`. The official code averages
    over the pairs of the batch's old-class examples only, so each such example gets
    `mean_k(pairs) * B / num_hard` (B and num_hard counted over real examples, `weight_B`); other
    examples get 0. The counts may be traced (`head.capacity`); `top_k` is static.
    """
    gt_B = jnp.take_along_axis(cos_BxC, y_B[:, None], axis=1)[:, 0]
    is_new = models.columns_below(cos_BxC, num_seen) & ~models.columns_below(cos_BxC, num_old)
    top_k = min(top_k, cos_BxC.shape[-1])
    hard_BxK, _ = jax.lax.top_k(jnp.where(is_new, cos_BxC, -jnp.inf), top_k)
    num_pairs = jnp.minimum(top_k, jnp.asarray(num_seen) - num_old)
    real_K = jnp.arange(top_k) < num_pairs
    pairs_BxK = jnp.where(real_K, jax.nn.relu(margin - gt_B[:, None] + hard_BxK), 0.0)
    pairs_B = pairs_BxK.sum(-1) / num_pairs.astype(cos_BxC.dtype)
    is_old_B = (y_B < num_old).astype(cos_BxC.dtype)
    scale = weight_B.sum() / jnp.maximum((weight_B * is_old_B).sum(), 1.0)
    return is_old_B * pairs_B * scale


@dataclasses.dataclass(frozen=True)
class LUCIR(Rehearsal):
    name = "lucir"
    head = "cosine"
    dynamic_phase = True
    train_keys = ("teacher",)
    eval_keys = ("class_means",)

    lambda_base: float = 5.0  # paper, CIFAR-100 (10 for ImageNet); official code, FACIL
    adaptive: bool = True  # Eq. 7, lambda_base * sqrt(num_old / num_new); official --adapt_lamda
    margin: float = 0.5  # m of Eq. 8 (paper: 0.5 in all experiments)
    top_k: int = 2  # K hard new classes per old-class example (paper: 2)
    lambda_mr: float = 1.0  # weight of the margin ranking loss (official code's lw_mr; FACIL)
    freeze_old_columns: bool = True  # old classes' weights fixed (official code, FACIL)
    last_relu: bool = False  # the backbone's last ReLU (the paper and FACIL remove it)
    imprint: bool = True  # new classes' weights from their mean features (official code)
    class_balanced_finetune: bool = False  # official --cb_finetune (its ImageNet-Full script only)
    cbf_epochs: int = 20  # official --ft_epochs
    cbf_lr: float = 0.01  # official --ft_base_lr
    cbf_milestones: tuple[int, ...] = (10,)  # official --ft_lr_strat

    def __post_init__(self):
        # A config may hand over a list; a tuple keeps the method hashable.
        object.__setattr__(self, "cbf_milestones", tuple(int(m) for m in self.cbf_milestones))
        if self.cbf_epochs < 1 or self.cbf_lr <= 0:
            raise ValueError(
                "method_args.cbf_epochs must be >= 1 and cbf_lr > 0, got "
                f"{self.cbf_epochs} and {self.cbf_lr}."
            )
        if self.lambda_base < 0 or self.lambda_mr < 0:
            raise ValueError(
                f"method_args.lambda_base and lambda_mr must be >= 0, got {self.lambda_base} "
                f"and {self.lambda_mr}."
            )
        if self.top_k < 1:
            raise ValueError(f"method_args.top_k must be >= 1, got {self.top_k}.")
        if self.margin < 0:
            raise ValueError(f"method_args.margin must be >= 0, got {self.margin}.")

    # Refused by `incremental learn` for a phase with no new classes:
    needs_new_classes = (
        "its distillation weight grows as sqrt(num_old / num_new) and its margin ranks new classes "
        "against old ones; with no new classes neither is defined."
    )
    not_task_incremental = (
        "its margin ranking and its cosine head balance new classes against old ones in one "
        "head; with the task label they never compete."
    )

    def online_problem(self) -> str | None:
        if not self.class_balanced_finetune:
            return None
        return (
            "with class_balanced_finetune its head trains cbf_epochs more epochs on the exemplars "
            "after the phase; online, each example is seen once (set it to False)."
        )

    def head_init(self, configured: str) -> str:
        return "imprint" if self.imprint and configured == "default" else configured

    def backbone(self, make, info: PhaseInfo, *, final: bool = False):
        del info, final
        return make() if self.last_relu else make(last_relu=False)

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        return PhaseSetup(freeze_old_columns=self.freeze_old_columns and info.num_old > 0)

    def less_forget_weight(self, info: PhaseInfo) -> float | jax.Array:
        if not self.adaptive:
            return self.lambda_base
        return adaptive_lambda(self.lambda_base, info.num_old, info.num_new)

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
        if "sigma" not in params["head"]:
            raise ValueError("LUCIR needs the cosine head; build the model with head='cosine'.")
        ce = models.cross_entropy(out.logits, batch.y)
        if "teacher" not in method_state:  # phase 0
            return ce, {"ce": ce}
        teacher_feats, _ = apply_fn(method_state["teacher"], batch.x, train=False)
        lf = self.less_forget_weight(info) * less_forget_loss(out.features, teacher_feats)
        unscaled = {**params["head"], "sigma": jnp.ones((), jnp.float32)}
        mr = self.lambda_mr * margin_ranking_loss(
            models.cosine_logits(out.features, unscaled),
            batch.y,
            batch.weight,
            num_old=info.num_old,
            num_seen=info.num_seen,
            top_k=self.top_k,
            margin=self.margin,
        )
        return ce + lf + mr, {"ce": ce, "lf": lf, "mr": mr}

    def compress(self, ctx: PhaseContext, variables: PyTree, method_state: dict):
        """Class-balanced finetuning of the head (phases > 0, `class_balanced_finetune`)."""
        if not self.class_balanced_finetune or ctx.info.num_old == 0:
            return variables, method_state
        config, info = ctx.config, ctx.info
        if config is None or ctx.fit is None:
            raise ValueError(
                "LUCIR's class-balanced finetuning trains through the phase context's `fit` "
                "service; build the context with `phase.context.make_context`."
            )
        # The exemplars the phase ends with: the backbone does not change, so end_phase selects
        # the same ones again.
        rows = np.asarray(self.next_memory(ctx, variables, method_state)["indices"])
        per_epoch = -(-len(rows) // config.train.batch_size)
        decay = {int(m) * per_epoch: config.train.lr_decay for m in self.cbf_milestones}
        sgd = optax.chain(
            optax.add_decayed_weights(config.train.weight_decay),
            optax.sgd(
                optax.piecewise_constant_schedule(self.cbf_lr, decay),
                momentum=config.train.momentum or None,
            ),
        )
        fresh = copy_tree(variables)  # `fit` donates what it trains
        tx = surgery.freeze(sgd, fresh["params"], ((r"head/kernel", False), (r".*", True)))
        key = jax.random.fold_in(jax.random.PRNGKey(ctx.seed), info.phase)
        tuned = ctx.fit(
            fresh,
            method=self,
            tx=tx,
            epochs=self.cbf_epochs,
            method_state=method_state,
            rng=jax.random.fold_in(key, 0xCBF),
            rows=rows,
            name=f"LUCIR's class-balanced finetuning, phase {info.phase}",
            setup=PhaseSetup(train_batch_norm=False),
        )
        return {"params": tuned["params"], "batch_stats": variables["batch_stats"]}, method_state

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        method_state = super().end_phase(ctx, variables, method_state)
        # Empty collections (an MLP has no batch_stats) are left out: a checkpoint keeps only arrays.
        teacher = snapshot(variables)
        return {**method_state, "teacher": teacher}
