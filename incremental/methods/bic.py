"""BiC: Wu, Chen, Wang, Ye, Liu, Guo & Fu 2019, "Large Scale Incremental Learning" (CVPR).

A rehearsal method (exemplar memory, NME reported beside the head) in two stages per phase:

1. Training, on the new classes' data plus the memory, minus a held-out validation set (below):
       (1 - lambda) * CE(all seen classes) + lambda * KD(old classes),   lambda = num_old / num_seen,
   KD = -sum_{c<old} softmax(t / T)_c log softmax(z_c / T), T = 2 (paper, PyCIL; no T^2 factor), t the
   previous phase's model (the teacher: a snapshot taken at the end of each phase, BatchNorm in
   inference mode, no gradient). Phase 0 is plain cross-entropy.
2. Bias correction (phases > 0, in `compress`, before the memory is updated): with the network fixed, a two-parameter layer corrects the new
   classes' logits, `alpha * z + beta`, old classes' logits unchanged (Eq. 5). alpha, beta are fitted
   by cross-entropy over all seen classes on the validation set: `split_ratio` of every old class's
   exemplars and as many examples of every new class, class-balanced, drawn at random from
   `config.seed` and the phase; the held-out examples are not trained on in that phase (they stay in
   the memory for later phases, as in PyCIL). The head's logits on the validation set are computed
   once, so the fit is a small jitted loop over (alpha, beta) alone.

The bias layers of all phases are kept (phase 0's classes have alpha = 1, beta = 0), stored per class
in `method_state["bias"] = {"alpha": (num_seen,), "beta": (num_seen,)}` (every class of a phase holds
its phase's values), and applied everywhere the network's logits are used, as PyCIL's
`IncrementalNetWithBias` does: in `predict`, to the teacher's logits that are distilled (the old model
with its bias correction, as the paper distils the corrected old model), and to the student's logits
in stage 1 (where the current phase's layer is still the identity, so old classes are trained in the
corrected space they are evaluated in).

Choices where the paper and PyCIL (`models/bic.py`) differ, or where this code departs from them:
- Validation size per class: PyCIL takes `int(split_ratio * memory_size / num_old)` examples, the
  per-class exemplar count of a fixed total budget; here `int(split_ratio * m)` with `m` the smallest
  number of exemplars an old class holds (the same count for a total budget, and also correct for
  `memory.per_class`), and at least 1. The paper splits the exemplars 9:1 (split_ratio 0.1).
- Bias-correction loss: the paper's cross-entropy on the corrected logits. PyCIL feeds softmax
  probabilities into `F.cross_entropy` (a softmax applied twice), which only shrinks its gradients.
- Bias-correction optimisation (`bias_stage`): 'full_batch' (the default) is the paper's loss with
  PyCIL's stage-2 settings (SGD, momentum 0.9, lr 0.1, weight decay 2e-4 on alpha and beta, lr
  divided by 10 at the milestones), one full-batch step per epoch on the un-augmented validation
  examples' logits, computed once: the problem is convex in (alpha, beta) and the validation set is
  small. 'pycil' is stage 2 as PyCIL runs it (`models/bic.py` lines 93-121 and 177-199 at 87cc411):
  minibatches (`config.train.batch_size`, shuffled) of the validation examples with the training
  augmentation, the network in train mode (BatchNorm normalises by batch statistics and its running
  averages move, and are kept), and the cross-entropy of the softmax probabilities. It runs through
  the phase context's `fit` service with alpha and beta as the only trained parameters.
  `configs/cifar100.py` sets 'pycil' so its numbers compare with PyCIL's.
- Stage 1 uses the run's optimiser config; PyCIL's BiC trains 250 epochs, lr 0.1 divided by 10 at
  epochs 100, 150, 200, weight decay 2e-4, batch 128, memory 2000 on CIFAR-100 (B0-Inc10).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from incremental import memory as memory_lib
from incremental import models
from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    data_of_classes,
)
from incremental.methods.distill import copy_tree, kd_loss, old_share, snapshot
from incremental.methods.rehearsal import Rehearsal
from incremental.models import head_logits

PyTree = Any
BIAS_STAGES = ("full_batch", "pycil")
BIAS_PARAM = "bias_layer"  # alpha, beta as a parameter while stage 2 runs through `ctx.fit`


def identity_bias(num_classes: int) -> dict:
    return {
        "alpha": jnp.ones((num_classes,), jnp.float32),
        "beta": jnp.zeros((num_classes,), jnp.float32),
    }


def correct(logits_BxC: jax.Array, bias: dict) -> jax.Array:
    """The bias layers: class c's logit becomes alpha_c * z_c + beta_c (identity for phase 0)."""
    num = logits_BxC.shape[-1]
    return logits_BxC * bias["alpha"][None, :num] + bias["beta"][None, :num]


def validation_split(
    memory: dict,
    y_train: np.ndarray,
    info: PhaseInfo,
    *,
    split_ratio: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """BiC's class-balanced held-out set of a phase > 0: `(indices, labels)`, as many of each class.

    Old classes give part of their exemplars, new classes as many of their training examples.
    """
    held = memory_lib.counts(memory, info.num_old)
    if held.min() < 2:
        raise ValueError(
            f"BiC holds out part of every old class's exemplars, but a class has {held.min()} in "
            f"phase {info.phase}; raise memory.budget (or memory.per_class)."
        )
    # At least one example per class, and (as split_ratio < 1) at least one exemplar left to train on.
    per_class = max(1, int(split_ratio * held.min()))
    new = data_of_classes(y_train, info.num_old, info.num_seen)
    mem_idx, mem_lab = np.asarray(memory["indices"]), np.asarray(memory["labels"])
    pools = [mem_idx[mem_lab == c] for c in range(info.num_old)]
    pools += [new[y_train[new] == c] for c in range(info.num_old, info.num_seen)]
    if min(len(p) for p in pools[info.num_old :]) <= per_class:
        raise ValueError(
            f"A new class of phase {info.phase} has at most {per_class} training examples, too few "
            "to hold out BiC's validation examples; lower method_args.split_ratio."
        )
    rng = np.random.default_rng([seed, info.phase])
    chosen = [np.sort(rng.choice(pool, per_class, replace=False)) for pool in pools]
    labels = np.repeat(np.arange(info.num_seen), per_class)
    return np.concatenate(chosen).astype(np.int64), labels


@functools.partial(
    jax.jit, static_argnames=("epochs", "lr", "momentum", "weight_decay", "milestones", "lr_decay")
)
def fit_bias_layer(
    logits_NxC: jax.Array,
    labels_N: jax.Array,
    is_new_C: jax.Array,
    *,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    milestones: tuple[int, ...],
    lr_decay: float,
) -> jax.Array:
    """Stage 2: `[alpha, beta]` minimising the CE of the corrected logits (full-batch SGD).

    `logits_NxC` are the held-out examples' logits with the earlier phases' corrections applied;
    `is_new_C` marks the classes this layer corrects.
    """
    schedule = optax.piecewise_constant_schedule(lr, {int(m): lr_decay for m in milestones})
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay), optax.sgd(schedule, momentum=momentum or None)
    )

    def loss_fn(ab):
        corrected = jnp.where(is_new_C[None, :], ab[0] * logits_NxC + ab[1], logits_NxC)
        return optax.softmax_cross_entropy_with_integer_labels(corrected, labels_N).mean()

    def step(carry, _):
        ab, opt_state = carry
        updates, opt_state = tx.update(jax.grad(loss_fn)(ab), opt_state, ab)
        return (optax.apply_updates(ab, updates), opt_state), None

    ab = jnp.array([1.0, 0.0], jnp.float32)
    (ab, _), _ = jax.lax.scan(step, (ab, tx.init(ab)), None, length=epochs)
    return ab


@dataclasses.dataclass(frozen=True)
class BiasCorrection(Method):
    """PyCIL's stage-2 objective: the CE of the softmax of the corrected logits (a softmax applied
    twice, as `F.cross_entropy(torch.softmax(logits, dim=1), targets)`), where this phase's classes
    are corrected by the trained `[alpha, beta]` and earlier ones by their fixed layers."""

    name = "bic_bias_correction"

    def loss(self, out: Outputs, batch: Batch, *, params, method_state, info, apply_fn):
        del apply_fn
        logits = out.logits[:, : info.num_seen].astype(jnp.float32)  # a capacity head is wider
        ab = params[BIAS_PARAM]
        is_new = jnp.arange(logits.shape[-1]) >= info.num_old
        earlier = correct(logits, method_state["bias"])  # this phase's classes: still identity
        corrected = jnp.where(is_new[None, :], ab[0] * logits + ab[1], earlier)
        ce = optax.softmax_cross_entropy_with_integer_labels(jax.nn.softmax(corrected), batch.y)
        return ce, {"ce": ce}


@dataclasses.dataclass(frozen=True)
class BiC(Rehearsal):
    """Exemplars, lambda-weighted distillation, and a bias-correction layer per phase."""

    name = "bic"
    not_online = (
        "{name}'s bias correction trains on a held-out part of the phase's data for bias_epochs "
        "after the phase; online, each example is seen once."
    )
    dynamic_phase = True
    train_keys = ("bias", "teacher")
    eval_keys = ("bias", "class_means")

    temperature: float = 2.0  # T of the distillation (paper, PyCIL)
    split_ratio: float = 0.1  # share of each old class's exemplars held out (paper 9:1, PyCIL 0.1)
    # Stage 2 runs the stage-1 schedule: the paper's CIFAR-100 one here (250 epochs, milestones
    # 100/150/200); PyCIL's models/bic.py (lines 12-19 at 87cc411) uses 170 and 60/100/140, which
    # configs/cifar100.py sets.
    bias_epochs: int = 250  # stage-2 epochs
    bias_lr: float = 0.1  # stage-2 SGD learning rate (paper, PyCIL)
    bias_momentum: float = 0.9  # (PyCIL)
    bias_weight_decay: float = 2e-4  # (PyCIL, on alpha and beta)
    bias_milestones: tuple[int, ...] = (100, 150, 200)  # lr times bias_lr_decay here
    bias_lr_decay: float = 0.1  # (PyCIL)
    bias_stage: str = "full_batch"  # 'full_batch' (paper's loss, cached logits) or 'pycil'

    def __post_init__(self):
        # A config may hand over a list; a tuple keeps the method hashable.
        object.__setattr__(self, "bias_milestones", tuple(int(m) for m in self.bias_milestones))
        if self.temperature <= 0:
            raise ValueError(f"method_args.temperature must be > 0, got {self.temperature}.")
        if not 0 < self.split_ratio < 1:
            raise ValueError(f"method_args.split_ratio must be in (0, 1), got {self.split_ratio}.")
        if self.bias_stage not in BIAS_STAGES:
            raise ValueError(
                f"method_args.bias_stage must be one of {BIAS_STAGES}, got {self.bias_stage!r}."
            )
        if self.bias_epochs < 1 or self.bias_lr <= 0:
            raise ValueError(
                "method_args.bias_epochs must be >= 1 and bias_lr > 0, got "
                f"{self.bias_epochs} and {self.bias_lr}."
            )

    # Refused by `incremental learn` for a phase with no new classes:
    needs_new_classes = (
        "its bias correction is fitted to the new classes' logits, and there are none."
    )
    not_task_incremental = (
        "its bias correction corrects the new classes' logits against the old ones' in one head; "
        "with the task label they never compete, so there is nothing to correct."
    )

    def init_state(self) -> dict:
        return {**super().init_state(), "bias": identity_bias(0)}

    def begin_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        """Appends the identity layer of this phase's classes; holds out the validation set.

        The layers have a value per head column: the seen classes', or every class of a
        `head.capacity` head (identity from `num_old` on)."""
        info = ctx.info
        bias = method_state["bias"]
        width = variables["params"]["head"]["kernel"].shape[-1]
        if bias["alpha"].shape[0] not in (info.num_old, width):
            raise ValueError(
                f"BiC's method state has bias layers for {bias['alpha'].shape[0]} classes at the "
                f"start of phase {info.phase}, which follows {info.num_old}; resume from a checkpoint "
                "written by bic with the same protocol."
            )
        if info.num_old and "teacher" not in method_state:
            raise ValueError(
                f"BiC phase {info.phase} has no teacher in its method state; start the run from "
                "phase 0 or resume from a checkpoint written by bic."
            )
        new = identity_bias(width - info.num_old)
        bias = {k: jnp.concatenate([bias[k][: info.num_old], new[k]]) for k in bias}
        method_state = {**method_state, "bias": bias}
        if info.num_old == 0:
            return method_state
        indices, labels = validation_split(
            method_state["memory"],
            ctx.y_train,
            info,
            split_ratio=self.split_ratio,
            seed=ctx.seed,
        )
        validation = {"indices": jnp.asarray(indices, jnp.int32), "labels": jnp.asarray(labels)}
        return {**method_state, "validation": validation}

    def train_indices(self, ctx: PhaseContext, method_state: dict) -> np.ndarray:
        """New data plus memory, without this phase's held-out validation examples."""
        idx = super().train_indices(ctx, method_state)
        if ctx.info.num_old == 0:
            return idx
        return idx[~np.isin(idx, np.asarray(method_state["validation"]["indices"]))]

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
        del params
        bias = method_state["bias"]
        logits = correct(out.logits.astype(jnp.float32), bias)
        ce = models.cross_entropy(logits, batch.y)
        if "teacher" not in method_state:  # phase 0 (`begin_phase` checks the later ones)
            return ce, {"ce": ce}
        _, teacher_logits = apply_fn(method_state["teacher"], batch.x, train=False)
        teacher_logits = correct(teacher_logits.astype(jnp.float32), bias)
        kd = kd_loss(logits, teacher_logits, self.temperature, info.num_old)
        lam, one_minus_lam = old_share(info.num_old, info.num_new)
        return one_minus_lam * ce + lam * kd, {"ce": ce, "kd": kd}

    def fit_bias(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> jax.Array:
        """Stage 2, 'full_batch': this phase's `[alpha, beta]` from the validation set's logits."""
        info, validation = ctx.info, method_state["validation"]
        feats = ctx.embed(variables, ctx.x_train[np.asarray(validation["indices"])])
        head = variables["params"]["head"]
        logits = head_logits(jnp.asarray(feats), head)[:, : info.num_seen]  # a capacity head's seen
        logits = correct(logits, method_state["bias"])
        return fit_bias_layer(
            logits,
            validation["labels"],
            jnp.arange(info.num_seen) >= info.num_old,
            epochs=self.bias_epochs,
            lr=self.bias_lr,
            momentum=self.bias_momentum,
            weight_decay=self.bias_weight_decay,
            milestones=self.bias_milestones,
            lr_decay=self.bias_lr_decay,
        )

    def fit_bias_as_pycil(self, ctx: PhaseContext, variables: PyTree, method_state: dict):
        """Stage 2, 'pycil': `([alpha, beta], variables)`, trained by the context's `fit` service
        on augmented minibatches in train mode; the returned variables carry the moved BatchNorm
        statistics, the parameters unchanged."""
        config, info = ctx.config, ctx.info
        if config is None or ctx.fit is None:
            raise ValueError(
                "BiC's bias_stage='pycil' trains through the phase context's `fit` service; build "
                "the context with `phase.context.make_context`."
            )
        rows = np.asarray(method_state["validation"]["indices"])
        per_epoch = -(-len(rows) // config.train.batch_size)
        boundaries = {int(m) * per_epoch: self.bias_lr_decay for m in self.bias_milestones}
        sgd = optax.chain(
            optax.add_decayed_weights(self.bias_weight_decay),
            optax.sgd(
                optax.piecewise_constant_schedule(self.bias_lr, boundaries),
                momentum=self.bias_momentum or None,
            ),
        )
        # Fresh buffers: `fit` donates the state it trains, and these variables are the phase's.
        fresh = copy_tree(variables)
        params = {**fresh["params"], BIAS_PARAM: jnp.array([1.0, 0.0], jnp.float32)}
        labels = {k: "bias" if k == BIAS_PARAM else "fixed" for k in params}
        tx = optax.multi_transform({"bias": sgd, "fixed": optax.set_to_zero()}, labels)
        key = jax.random.fold_in(jax.random.PRNGKey(ctx.seed), info.phase)
        trained = ctx.fit(
            {**fresh, "params": params},
            method=BiasCorrection(),
            tx=tx,
            epochs=self.bias_epochs,
            method_state={"bias": copy_tree(method_state["bias"])},
            rng=jax.random.fold_in(key, 0xB1C),
            rows=rows,
            name=f"BiC's bias correction, phase {info.phase}",
        )
        ab = trained["params"][BIAS_PARAM]
        stats = trained["batch_stats"]
        return ab, {"params": variables["params"], "batch_stats": stats}

    def compress(self, ctx: PhaseContext, variables: PyTree, method_state: dict):
        """Stage 2 (phases > 0): this phase's bias layer, fitted on the validation set."""
        info = ctx.info
        if info.num_old == 0:
            return variables, method_state
        if self.bias_stage == "pycil":
            ab, variables = self.fit_bias_as_pycil(ctx, variables, method_state)
        else:
            ab = self.fit_bias(ctx, variables, method_state)
        bias = method_state["bias"]
        bias = {
            "alpha": bias["alpha"].at[info.num_old : info.num_seen].set(ab[0]),
            "beta": bias["beta"].at[info.num_old : info.num_seen].set(ab[1]),
        }
        return variables, {**method_state, "bias": bias}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        method_state = super().end_phase(ctx, variables, method_state)
        return {**method_state, "teacher": snapshot(variables)}

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        return correct(out.logits.astype(jnp.float32), method_state["bias"])
