"""FOSTER: Feature Boosting and Compression (Wang, Zhou, Ye and Zhan, ECCV 2022).

Phase 0 trains one backbone with cross-entropy. Every later phase has two stages:

- Boosting (the phase's training): the model is two `models.Branches`, `branch_0` the previous
  phase's (compressed) backbone, frozen with its BatchNorm in inference mode, and `branch_1` a copy
  of it that trains; their features are concatenated. The head over the concatenation keeps its old
  weights, gets zero rows for the new branch's features (`surgery.add_branch`) and new columns for
  the new classes. An auxiliary classifier `fe_fc` on the new branch's features alone covers all
  seen classes (params key `fe_fc`, dropped by `compress`). Per example the loss is
      CE(z / w, y) + CE(fe_fc(f_new), y) + lambda_okd * KD_T(z[:old], z_old),
  with w the class-balanced weights (`effective_number_weights`, beta1) of the phase's training
  counts (new data plus memory): dividing the training logits by w, as PyCIL does, makes the rare
  old classes' logits grow during training, a logit adjustment towards a balanced classifier. z_old
  are the previous model's logits: the previous head applied to `branch_0`'s features, which are
  exactly the previous model's features (PyCIL's `oldfc`), so no second forward pass is needed.
- Compression (`compress`, after the training): the two-branch model, fixed, is distilled into a
  single backbone with one head over all seen classes, on the same data (new data plus memory),
  for `compression_epochs` with SGD (`config.train.lr`, momentum, no weight decay, cosine
  schedule, as PyCIL). The student starts as PyCIL's does: the old backbone (`branch_0`) and the
  old head's columns, with fresh columns for the new classes. The loss is balanced KD:
      BKD = -sum_c q_c log softmax(s / T)_c,   q proportional to w2_c * softmax(t / T)_c,
  with w2 the beta2 weights. The student is the phase's final model: it is evaluated, selects the
  exemplars, is saved, and is grown into two branches by the next phase.

Which model a phase reports (`report`): PyCIL (`models/foster.py` at 87cc411, lines 37-46 and 72-74)
and the official code (G-U-N/ECCV22-FOSTER at 555c7f0, the same lines of its `models/foster.py`)
evaluate the two-branch model of each phase and select its exemplars with that model's features;
the student only logs its accuracy ("darknet eval", PyCIL lines 370-386) and replaces the
two-branch model at the start of the next phase (`self._network = self._snet`, line 41), where it
is the old model and the new phase's `branch_0`. `report='teacher'` (the default) does the same:
the phase's final model (evaluated, its exemplars and NME means, saved) is the teacher, and the
student, kept in the method state (`student`), is what the next phase grows from and distils from.
`report='student'` is the paper's model: the phase ends with the student and everything after
training uses it. Either way the other one is scored too, under `student_*` (or `teacher_*`) keys
of results.json; in phase 0 both are the one model.

`beta1` is one value for every phase (PyCIL's `exps/foster.json`: 0.96, its B50-Inc10 setting) or
one per phase after the first, as the official B0-Inc10 config gives it (`configs/cifar/b0inc10.json`
at 555c7f0: 0.98 down to 0.94 in steps of 0.005; `models/foster.py` lines 92-95 index it by phase).

The official code trains CIFAR-100 with AutoAugment's CIFAR-10 policy and Cutout(16) after PyCIL's
crop, flip and brightness (`utils/data.py` lines 72-80 at 555c7f0); PyCIL does not (its
`utils/data.py` has crop, flip and brightness only). They are `augment.autoaugment='cifar10'`
(`data/autoaugment.py`) and `augment.cutout=16`, on in `configs/cifar100.py` for FOSTER.

Other choices where the paper, PyCIL and this code differ:
- The head rows of the new branch's features start at zero, so boosting starts from the old model's
  outputs; PyCIL leaves the old classes' rows for them at the layer's random initialisation.
- Class counts are those of the phase's data (the exemplars actually held); PyCIL uses the nominal
  per-class memory size for old classes.
- `oofc='az'` (zeroing the new classes' weights on the old features) is not implemented; PyCIL's
  default is 'ft'.
- Optimisation of the boosting stage lives in the config (PyCIL: 170 epochs, lr 0.1, batch 128,
  weight decay 5e-4, cosine; memory 2000).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import surgery
from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
)
from incremental.methods.der import copy_last_branch
from incremental.methods.distill import copy_tree, kd_loss
from incremental.methods.rehearsal import Rehearsal
from incremental.methods.wa import align_gamma
from incremental.models import Branches, head_logits

PyTree = Any
AUX = "fe_fc"  # the new branch's classifier: {'kernel': (D, num_seen), 'bias': (num_seen,)}
OOFC = ("ft",)
REPORTS = ("teacher", "student")


def effective_number_weights(counts_C: np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced weights (Cui et al. 2019): (1 - beta) / (1 - beta**n_c), scaled to sum to C."""
    counts_C = np.asarray(counts_C, np.float64)
    weights = (1.0 - beta) / (1.0 - np.power(beta, counts_C))
    return (weights / weights.sum() * len(counts_C)).astype(np.float32)


def bkd_loss(
    logits_BxC: jax.Array, teacher_logits_BxC: jax.Array, weights_C: jax.Array, temperature: float
) -> jax.Array:
    """Per example: balanced KD, the teacher's softened softmax reweighted by class and renormalised."""
    soft = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits_BxC) / temperature)
    soft = soft * weights_C[None, :]
    soft = soft / soft.sum(-1, keepdims=True)
    return optax.softmax_cross_entropy(logits_BxC / temperature, soft)


@dataclasses.dataclass(frozen=True)
class BalancedDistillation(Method):
    """The compression stage's objective: BKD of a fixed teacher, held in the method state."""

    name = "foster_compression"
    teacher_apply: Callable | None = None  # (variables, x, train=False) -> (features, logits)
    temperature: float = 2.0

    def loss(self, out: Outputs, batch: Batch, *, params, method_state, info, apply_fn):
        del params, info, apply_fn
        _, teacher_logits = self.teacher_apply(method_state["teacher"], batch.x, train=False)
        bkd = bkd_loss(
            out.logits.astype(jnp.float32),
            teacher_logits.astype(jnp.float32),
            method_state["weights"],
            self.temperature,
        )
        return bkd, {"bkd": bkd}


@dataclasses.dataclass(frozen=True)
class FOSTER(Rehearsal):
    """Two-branch feature boosting, then distillation back into one backbone, every phase > 0."""

    name = "foster"
    not_online = (
        "{name}'s compression stage distils the phase's data into a student for "
        "compression_epochs more epochs; online, each example is seen once."
    )
    # Only what the jitted steps read: not the memory, nor the student kept for the next phase.
    train_keys = ("old_head", "boost_weights")
    eval_keys = ("class_means",)
    # Effective-number beta of the boosting stage's logit adjustment: one value (PyCIL), or one per
    # phase after the first (the official B0-Inc10 config).
    beta1: float | tuple[float, ...] = 0.96
    beta2: float = 0.97  # effective-number beta of the compression stage's balanced KD (PyCIL)
    oofc: str = "ft"  # the new classes' weights on the old features: 'ft' train them (PyCIL)
    lambda_okd: float = 1.0  # weight of the KD from the old model in boosting (PyCIL)
    temperature: float = 2.0  # T of both distillations (PyCIL)
    is_teacher_wa: bool = False  # weight-align the two-branch model before compression (PyCIL)
    is_student_wa: bool = False  # weight-align the student after compression (PyCIL)
    wa_value: float = 1.0  # weight aligning multiplies gamma by wa_value ** (old / new) (PyCIL)
    compression_epochs: int = 130  # epochs of the compression stage (PyCIL, CIFAR-100)
    compression_weight_decay: float = 0.0  # PyCIL's compression optimizer has none
    report: str = "teacher"  # the phase's model: 'teacher' (PyCIL, official code) or 'student'

    def __post_init__(self):
        if isinstance(self.beta1, (list, tuple)):
            object.__setattr__(self, "beta1", tuple(float(b) for b in self.beta1))
        betas = {"beta1": self.beta1, "beta2": self.beta2}
        for field, value in betas.items():
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(0 < v < 1 for v in values):
                raise ValueError(
                    f"method_args.{field} must be in (0, 1) (beta1 may be one per phase after the "
                    f"first), got {value}."
                )
        if self.report not in REPORTS:
            raise ValueError(
                f"method_args.report must be one of {REPORTS} (the model each phase reports), got "
                f"{self.report!r}."
            )
        if self.oofc not in OOFC:
            raise ValueError(
                f"method_args.oofc must be one of {OOFC} ('az' is not implemented), got "
                f"{self.oofc!r}."
            )
        if self.temperature <= 0:
            raise ValueError(f"method_args.temperature must be > 0, got {self.temperature}.")
        if self.lambda_okd < 0 or self.compression_weight_decay < 0 or self.wa_value <= 0:
            raise ValueError(
                "method_args.lambda_okd and compression_weight_decay must be >= 0 and wa_value "
                f"> 0, got {self.lambda_okd}, {self.compression_weight_decay}, {self.wa_value}."
            )
        if self.compression_epochs < 1:
            raise ValueError(
                f"method_args.compression_epochs must be >= 1, got {self.compression_epochs}."
            )

    def backbone(self, make, info: PhaseInfo, *, final: bool = False):
        if info.phase == 0 or (final and self.report == "student"):
            return make()
        return two_branches(make)

    def grow_from(self, variables, method_state: dict):
        """The student of the phase that just ended, where the teacher was its reported model."""
        return method_state.get("student", variables)

    def companions(self, info: PhaseInfo, variables, method_state: dict):
        """The student beside the reported teacher (`report='teacher'`), or the other way round."""
        other = "student" if self.report == "teacher" else "teacher"
        if info.phase == 0:  # one model: it is both
            return {other: (single_branch, variables)}
        backbone = single_branch if other == "student" else two_branches
        return {other: (backbone, method_state[other])}

    def beta1_of(self, phase: int) -> float:
        """The boosting stage's beta1 in `phase` (>= 1)."""
        if not isinstance(self.beta1, tuple):
            return self.beta1
        if phase > len(self.beta1):
            raise ValueError(
                f"method_args.beta1 has {len(self.beta1)} values, one per phase after the first, "
                f"but the protocol has a phase {phase}; give one value per later phase, or one "
                "value for all."
            )
        return self.beta1[phase - 1]

    # Refused by `incremental learn` for a phase with no new classes:
    needs_new_classes = (
        "it boosts with a second backbone whose logit adjustment weighs old against new classes "
        "(num_old / num_new), and there are none."
    )
    not_task_incremental = (
        "its logit adjustment and balanced distillation weigh old against new classes in one "
        "head; with the task label they never compete."
    )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0:
            return PhaseSetup()
        # The head rule matches in the final (single-backbone) params too, where the optimizer is
        # rebuilt for the compressed model; a rule list must match somewhere.
        return PhaseSetup(freeze=((r"backbone/branch_0/.*", True), (r"head/.*", False)))

    def grow(self, ctx: PhaseContext, variables, key: jax.Array):
        """The single backbone becomes `branch_0` (old) and `branch_1` (its copy); adds `fe_fc`."""
        params = variables["params"]
        if any(str(k).startswith(surgery.BRANCH) for k in params["backbone"]):
            raise ValueError(
                "FOSTER grows a single backbone into two branches, but the previous phase's model "
                "already has branches; resume only from checkpoints written by foster."
            )
        dim = params["head"]["kernel"].shape[0]
        params = surgery.add_branch(
            {**params, "backbone": {"branch_0": params["backbone"]}}, feature_dim=dim
        )
        num_seen = ctx.info.num_seen
        params[AUX] = {
            "kernel": jax.nn.initializers.lecun_normal()(key, (dim, num_seen), jnp.float32),
            "bias": jnp.zeros((num_seen,), jnp.float32),
        }
        stats = variables["batch_stats"]
        if stats:
            stats = copy_last_branch({**stats, "backbone": {"branch_0": stats["backbone"]}})
        return {"params": params, "batch_stats": stats}

    def class_counts(self, ctx: PhaseContext, method_state: dict) -> np.ndarray:
        """Training examples of each seen class in this phase's data (new data plus memory)."""
        labels = ctx.y_train[self.train_indices(ctx, method_state)]
        counts = np.bincount(labels, minlength=ctx.info.num_seen)
        if (counts == 0).any():
            raise ValueError(
                f"FOSTER's class-balanced weights need training examples of every seen class, but "
                f"classes {np.flatnonzero(counts == 0).tolist()} have none in phase "
                f"{ctx.info.phase}; raise memory.budget (or memory.per_class)."
            )
        return counts

    def begin_phase(self, ctx: PhaseContext, variables, method_state: dict) -> dict:
        del variables
        if ctx.info.phase == 0:
            return method_state
        if "old_head" not in method_state:
            raise ValueError(
                f"FOSTER phase {ctx.info.phase} has no previous head in its method state; start "
                "the run from phase 0 or resume from a checkpoint written by foster."
            )
        counts = self.class_counts(ctx, method_state)
        weights = effective_number_weights(counts, self.beta1_of(ctx.info.phase))
        return {**method_state, "boost_weights": jnp.asarray(weights)}

    def loss(self, out: Outputs, batch: Batch, *, params, method_state, info, apply_fn):
        del apply_fn
        logits = out.logits.astype(jnp.float32)
        if AUX not in params:  # phase 0: one backbone, plain cross-entropy
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y)
            return ce, {"ce": ce}
        adjusted = logits / method_state["boost_weights"][None, :]
        ce = optax.softmax_cross_entropy_with_integer_labels(adjusted, batch.y)
        dim = params[AUX]["kernel"].shape[0]
        fe_logits = head_logits(out.features[:, dim:], params[AUX])
        fe = optax.softmax_cross_entropy_with_integer_labels(fe_logits, batch.y)
        # branch_0 is the frozen old backbone: its features and the old head give the old model.
        old_logits = head_logits(out.features[:, :dim], method_state["old_head"])
        kd = kd_loss(logits[:, : info.num_old], old_logits, self.temperature)
        return ce + fe + self.lambda_okd * kd, {"ce": ce, "fe": fe, "kd": kd}

    def compress(self, ctx: PhaseContext, variables, method_state: dict):
        """Distils the two-branch model into one backbone (phase > 0). Returns the reported model
        (the teacher without `fe_fc`, or the student) and keeps the other in the method state."""
        if ctx.info.phase == 0:
            return variables, method_state
        params = {k: v for k, v in variables["params"].items() if k != AUX}
        teacher = {**variables, "params": params}
        if self.is_teacher_wa:
            teacher = self.weight_align(teacher, ctx.info)
        student = self.distil(ctx, teacher, method_state)
        if self.is_student_wa:
            student = self.weight_align(student, ctx.info)
        drop = ("boost_weights", "student", "teacher")
        method_state = {k: v for k, v in method_state.items() if k not in drop}
        if self.report == "teacher":
            return teacher, {**method_state, "student": student}
        return student, {**method_state, "teacher": teacher}

    def weight_align(self, variables, info: PhaseInfo):
        """PyCIL's `weight_align`: new columns scaled to the old ones' mean norm (times a factor)."""
        head = variables["params"]["head"]
        gamma = align_gamma(head["kernel"], info.num_old) * self.wa_value ** (
            info.num_old / info.num_new
        )
        kernel = head["kernel"].at[:, info.num_old :].multiply(gamma)
        return {**variables, "params": {**variables["params"], "head": {**head, "kernel": kernel}}}

    def student_init(self, teacher, old_head: dict, info: PhaseInfo, key: jax.Array):
        """PyCIL's student: the old backbone (`branch_0`) and head, new columns fresh."""
        head = surgery.widen_head({"head": old_head}, info.num_new, key)["head"]
        params = {"backbone": teacher["params"]["backbone"]["branch_0"], "head": head}
        stats = teacher["batch_stats"]
        stats = {"backbone": stats["backbone"]["branch_0"]} if stats else {}
        # Fresh buffers: the student's train state is donated, the teacher is still needed.
        return copy_tree({"params": params, "batch_stats": stats})

    def distil(self, ctx: PhaseContext, teacher, method_state: dict):
        """The compression stage: the student trained by the context's `fit` service."""
        config, info = ctx.config, ctx.info
        if config is None or ctx.fit is None or ctx.apply_fn is None:
            raise ValueError(
                "FOSTER's compression trains a student: the phase context needs `config`, `fit` "
                "and `apply_fn` (as `phase.context.make_context` builds it)."
            )
        key = jax.random.fold_in(jax.random.PRNGKey(ctx.seed), info.phase)
        init_key, train_key = jax.random.split(jax.random.fold_in(key, 0x0F05))
        variables = self.student_init(teacher, method_state["old_head"], info, init_key)
        rows = self.train_indices(ctx, method_state)
        total = self.compression_epochs * -(-len(rows) // config.train.batch_size)
        tx = optax.chain(
            optax.add_decayed_weights(self.compression_weight_decay),
            optax.sgd(
                optax.cosine_decay_schedule(config.train.lr, total),
                momentum=config.train.momentum or None,
            ),
        )
        weights = effective_number_weights(self.class_counts(ctx, method_state), self.beta2)
        return ctx.fit(
            variables,
            method=BalancedDistillation(teacher_apply=ctx.apply_fn, temperature=self.temperature),
            tx=tx,
            epochs=self.compression_epochs,
            method_state={"teacher": teacher, "weights": jnp.asarray(weights)},
            rng=train_key,
            rows=rows,
            name=f"FOSTER's compression, phase {info.phase}",
            backbone=single_branch,
        )

    def end_phase(self, ctx: PhaseContext, variables, method_state: dict) -> dict:
        """Exemplars by the reported model's features; the old head for the next phase is that of
        the model it grows from (the student, PyCIL's `oldfc` after `self._network = self._snet`)."""
        method_state = super().end_phase(ctx, variables, method_state)
        old_head = self.grow_from(variables, method_state)["params"]["head"]
        return {**method_state, "old_head": copy_tree(old_head)}


def single_branch(make):
    return make()


def two_branches(make):
    """The boosting model's backbone: `branch_0` frozen (BatchNorm in inference mode), `branch_1`."""
    return Branches(make(), num_branches=2, frozen=1)
