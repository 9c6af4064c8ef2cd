"""EWC and online EWC: a quadratic penalty that holds parameters important for past phases in place.

`ewc`: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS), as
PyCIL implements it for class-incremental learning (the reference of the figures in
`configs/cifar100.py`). `online_ewc`: Schwarz et al. 2018, "Progress & Compress: A scalable framework
for continual learning" (ICML), in the online form that van de Ven et al. also use.

For phases after the first, the loss is a classification loss plus

    (strength / 2) * sum_i F_i (theta_i - theta*_i)^2

over every parameter: the backbone and the old head columns. The head's importance and anchor are
widened with zeros at the start of each phase (`surgery.widen_like`), so the new columns are free
(PyCIL slices `p[:len(mean)]`, the same). The penalty is added to every example's loss; the step
averages over examples, so it counts once per step.

`ewc` follows PyCIL (github.com/G-U-N/PyCIL at 87cc4110d60765dc3f64af7ef7a693efed8418ff,
`models/ewc.py`) by default; every choice is an option:
- `fisher='batch'` (PyCIL `getFisherDiagonal`, lines 234-254): the squared gradient of the batch-mean
  cross-entropy over all seen classes' logits, for batches of `fisher_batch_size` = 128 examples of
  the phase's classes in a shuffled order (the last one shorter), averaged over the batches and
  clipped at `fisher_max` = 1e-4 (`fishermax`, line 32); the network in train mode, so BatchNorm
  normalises with each batch's statistics. Two differences, both small: PyCIL's loader applies the
  training augmentations and its train-mode pass also moves the BatchNorm running averages; here the
  examples are not augmented and the running averages stay as training left them.
  `fisher='per_example'`: the mean over the phase's examples of the squared per-example gradient of
  log p(y | x) (the empirical Fisher of the paper's derivation), BatchNorm in inference mode, not
  clipped; about two orders of magnitude larger than the batch estimate, since squaring a batch mean
  divides the variance part by the batch size.
- `accumulate='average'` (PyCIL lines 75-90): F <- alpha F_old + (1 - alpha) F_t with alpha =
  num_old / num_seen on the parameters F_old covers; the new classes' head columns take F_t. The
  anchor is the latest parameters. `accumulate='sum'`: the paper's sum of one penalty per finished
  phase, each at its own anchor. A sum of quadratic penalties is itself one quadratic penalty: with
  F = sum_t F_t and the Fisher-weighted anchor theta* = sum_t F_t theta*_t / F, the gradient is that
  of the sum and the value differs by a constant, so the state holds one `fisher` and one `anchor`.
- `loss_classes='new'` (PyCIL lines 172-176): cross-entropy over the new classes' logits only (FACIL
  too); `'seen'`: over all seen classes, as the paper trains its single network on the new task.
- In the task scenario (`protocol.scenario='task'`) both estimators take the log-likelihood over
  the phase's own head block, the task's head, as the task-aware model predicts (MAS's output norm
  too, through `mean_over_phase_data`).
- `strength` = 1000 (PyCIL `lamda`, line 31; the penalty's 1/2 is PyCIL's, line 220). FACIL uses
  lamb = 5000 with the same form.

`online_ewc` keeps the estimator of van de Ven et al.'s implementation (per-example, all seen
classes' cross-entropy) and one running Fisher F <- gamma F + F_t anchored at the latest parameters
(github.com/GMvandeVen/continual-learning, `--gamma`, default 1.0). Progress & Compress also multiplies
the penalty's Fisher by gamma, a rescaling of the strength; we do not. FACIL's EWC (alpha = 0.5
averaging) is `ewc` with `accumulate='average'` at a fixed alpha: `online_ewc` with gamma = 0.5 and
half the strength.

Two practical limits, both properties of the method rather than of this code:
- The empirical Fisher vanishes where the phase's training data are fit almost perfectly (the
  gradient of log p(y | x) goes to 0 as p(y | x) goes to 1).
- With SGD, a quadratic penalty is stable only while lr * strength * importance_i < 2 (1 + momentum)
  for every parameter; beyond that the run stops with a non-finite loss. PyCIL's clip keeps
  lr * strength * F <= 0.1 * 1000 * 1e-4 = 0.01; the unclipped estimators can exceed the limit. Lower
  the strength (or the learning rate) when that happens.
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

from incremental import models, surgery
from incremental.methods.base import (
    LOSS_CLASSES,
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    check_choice,
    classified_logits,
    new_logits_problem,
    phase_data,
    task_block_start,
)
from incremental.methods.distill import copy_tree

PyTree = Any
FISHERS = ("batch", "per_example")
ACCUMULATIONS = ("average", "sum")
# (logits_fn, params, y) -> a params-shaped tree for one example; logits_fn(params) -> (C,)
ExampleFn = Callable[[Callable[[PyTree], jax.Array], PyTree, jax.Array], PyTree]


def mean_over_phase_data(
    ctx: PhaseContext, variables: PyTree, example_fn: ExampleFn, batch_size: int
) -> PyTree:
    """The mean of `example_fn` over the training examples of the phase's classes.

    Examples go through one jitted `lax.scan` over fixed-size batches (the last one padded with
    weight 0), each batch by `jax.vmap` over examples, with BatchNorm in inference mode.

    Args:
      ctx: the phase context; needs `apply_fn` and `normalize`.
      variables: `{'params': ..., 'batch_stats': ...}` at which to evaluate.
      example_fn: `(logits_fn, params, y) -> tree` for one example, where `logits_fn(params)` gives
        that example's logits (num_seen,).
      batch_size: examples per vmapped batch (memory only).

    Returns:
      A tree shaped like `variables['params']`.
    """
    _check_context(ctx)
    if batch_size < 1:
        raise ValueError(f"The importance batch size must be >= 1, got {batch_size}.")
    idx = phase_data(ctx)  # the examples the phase brings
    if len(idx) == 0:
        raise ValueError(
            f"Phase {ctx.info.phase} has no training examples to estimate importances."
        )
    num_batches = -(-len(idx) // batch_size)
    padded = np.resize(idx, num_batches * batch_size)  # repeats the first indices as padding
    weight = (np.arange(len(padded)) < len(idx)).astype(np.float32)
    x = ctx.x_train[padded].reshape(num_batches, batch_size, *ctx.x_train.shape[1:])
    y = ctx.y_train[padded].reshape(num_batches, batch_size)
    weight = weight.reshape(num_batches, batch_size)
    first = task_block_start(ctx)
    mean_fn = _mean_fn(ctx.apply_fn, ctx.normalize, example_fn, ctx.info.num_seen, first)
    return mean_fn(variables, x, y, weight)


def _check_context(ctx: PhaseContext) -> None:
    if ctx.apply_fn is None or ctx.normalize is None:
        raise ValueError(
            "This method needs PhaseContext.apply_fn and PhaseContext.normalize; build the context "
            "as incremental.run.train_phase does."
        )


@functools.lru_cache(maxsize=16)  # the same model and rule again reuse the compiled function
def _mean_fn(
    apply_fn: Callable, normalize: Callable, example_fn: ExampleFn, num_seen: int, first: int = 0
) -> Callable:
    """Jitted `(variables, x_NxB, y_NxB, weight_NxB) -> weighted mean of example_fn`, over the
    logits of classes `first..num_seen - 1` (a `head.capacity` head has more columns; the task
    scenario's block starts at `first`), the labels shifted to match."""

    @jax.jit
    def mean(variables, x_NxB, y_NxB, weight_NxB):
        batch_stats = variables.get("batch_stats", {})

        def one(params, x, y):
            def logits_fn(p):
                variables_p = {"params": p, "batch_stats": batch_stats}
                _, logits_1xC = apply_fn(variables_p, normalize(x[None]), train=False)
                return logits_1xC[0, first:num_seen]

            return example_fn(logits_fn, params, y - first if first else y)

        def step(acc, batch):
            x_B, y_B, w_B = batch
            trees_B = jax.vmap(one, in_axes=(None, 0, 0))(variables["params"], x_B, y_B)
            weigh = lambda t: jnp.sum(t * w_B.reshape((-1,) + (1,) * (t.ndim - 1)), axis=0)
            return jax.tree.map(lambda a, t: a + weigh(t), acc, trees_B), None

        zeros = jax.tree.map(jnp.zeros_like, variables["params"])
        acc, _ = jax.lax.scan(step, zeros, (x_NxB, y_NxB, weight_NxB))
        return jax.tree.map(lambda a: a / weight_NxB.sum(), acc)

    return mean


def squared_log_likelihood_grad(logits_fn, params: PyTree, y: jax.Array) -> PyTree:
    """One example's empirical Fisher term: (d log p(y | x) / d theta)^2."""
    grads = jax.grad(lambda p: jax.nn.log_softmax(logits_fn(p))[y])(params)
    return jax.tree.map(jnp.square, grads)


def batch_fisher(
    ctx: PhaseContext, variables: PyTree, batch_size: int, fisher_max: float
) -> PyTree:
    """PyCIL's Fisher: min(mean over batches of (d mean-batch-CE / d theta)^2, fisher_max).

    The phase's training examples in a shuffled order (seeded by the run's seed and the phase) are cut
    into batches of `batch_size`, the last one shorter; each batch's gradient of its mean
    cross-entropy over all seen classes' logits, with BatchNorm in train mode (the batch's own
    statistics), is squared; the squares are averaged over the batches and clipped at `fisher_max`.
    """
    _check_context(ctx)
    idx = phase_data(ctx)  # the examples the phase brings
    if len(idx) == 0:
        raise ValueError(f"Phase {ctx.info.phase} has no training examples to estimate a Fisher.")
    order = np.random.default_rng([ctx.seed, ctx.info.phase]).permutation(idx)
    first = task_block_start(ctx)
    squared_grad = _squared_batch_grad(ctx.apply_fn, ctx.normalize, ctx.info.num_seen, first)
    total, num_batches = None, 0
    for start in range(0, len(order), batch_size):  # at most two shapes: full batches, the rest
        rows = order[start : start + batch_size]
        square = squared_grad(variables, ctx.x_train[rows], ctx.y_train[rows])
        total = square if total is None else _tree_add(total, square)
        num_batches += 1
    return _clipped_mean(total, num_batches, fisher_max)


@functools.lru_cache(maxsize=16)
def _squared_batch_grad(
    apply_fn: Callable, normalize: Callable, num_seen: int, first: int = 0
) -> Callable:
    @jax.jit
    def squared_grad(variables, x_B, y_B):
        def loss(params):
            variables_p = {"params": params, "batch_stats": variables.get("batch_stats", {})}
            (_, logits), _ = apply_fn(
                variables_p, normalize(x_B), train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, first:num_seen].astype(jnp.float32), y_B - first if first else y_B
            ).mean()

        return jax.tree.map(jnp.square, jax.grad(loss)(variables["params"]))

    return squared_grad


_tree_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


@jax.jit
def _clipped_mean(total: PyTree, count, fisher_max) -> PyTree:
    return jax.tree.map(lambda t: jnp.minimum(t / count, fisher_max), total)


def quadratic_penalty(params: PyTree, importance: PyTree, anchor: PyTree) -> jax.Array:
    """sum_i importance_i (params_i - anchor_i)^2 over all leaves (without the factor 1/2)."""
    terms = jax.tree.map(lambda p, f, a: jnp.sum(f * jnp.square(p - a)), params, importance, anchor)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


# Between-phase tree arithmetic, jitted so that each phase compiles once rather than once per op.
# Outputs of a jitted function are fresh buffers, so they never alias the (donated) train state.
widen_state = jax.jit(surgery.widen_like, static_argnums=1)


@jax.jit
def decayed_sum(old: PyTree, new: PyTree, params: PyTree, decay: float) -> dict:
    """`{'importance': decay * old + new, 'anchor': params}`."""
    total = jax.tree.map(lambda o, n: decay * o + n, old, new)
    return {"importance": total, "anchor": jax.tree.map(jnp.copy, params)}


@functools.partial(jax.jit, static_argnums=(3, 4))
def averaged(old: PyTree, new: PyTree, params: PyTree, num_old: int, num_seen: int) -> dict:
    """PyCIL's merge: alpha F_old + (1 - alpha) F_new, alpha = num_old / num_seen, where F_old covers
    the parameters (the new classes' head columns take F_new); the anchor is `params`."""
    alpha = num_old / num_seen
    # alpha on what the old Fisher covers, 0 on the new columns (`old` is already widened) and
    # on a `head.capacity` head's unseen ones.
    width = old["head"]["kernel"].shape[-1]
    weight = surgery.widen_like(
        surgery.narrow_head(jax.tree.map(lambda o: jnp.full_like(o, alpha), old), num_old),
        width - num_old,
    )
    total = jax.tree.map(lambda w, o, n: w * o + (1 - w) * n, weight, old, new)
    return {"importance": total, "anchor": jax.tree.map(jnp.copy, params)}


@jax.jit
def summed_penalties(old: PyTree, anchor: PyTree, new: PyTree, params: PyTree) -> dict:
    """One penalty equal (up to a constant) to the sum of (old, anchor)'s and (new, params)'s.

    sum_t F_t (theta - a_t)^2 = F (theta - a)^2 + const with F = sum_t F_t and a = sum_t F_t a_t / F;
    where F = 0 the anchor does not matter and is set to `params`.
    """
    total = jax.tree.map(jnp.add, old, new)

    def weighted(f_old, a_old, f_new, p, f_sum):
        safe = jnp.where(f_sum > 0, f_sum, 1)
        return jnp.where(f_sum > 0, (f_old * a_old + f_new * p) / safe, p)

    return {"importance": total, "anchor": jax.tree.map(weighted, old, anchor, new, params, total)}


def new_columns(tree: PyTree, params: PyTree) -> int:
    """How many head columns `params` has beyond `tree` (a state shaped like earlier params)."""
    if "head" not in params:
        return 0
    return params["head"]["kernel"].shape[-1] - tree["head"]["kernel"].shape[-1]


@dataclasses.dataclass(frozen=True)
class QuadraticPenalty(Method):
    """Cross-entropy plus (strength / 2) sum_i w_i (theta_i - theta*_i)^2 after the first phase.

    Subclasses say how a phase's importance `w` is estimated (`importance`) and how it is merged with
    the earlier ones (`merge`); the state is `{importance_key: tree, 'anchor': tree}`.
    """

    name = "quadratic_penalty"
    dynamic_phase = True
    importance_key = "importance"

    strength: float = 1.0
    importance_batch_size: int = 64  # examples per vmapped batch of per-example gradients (memory)
    # The classification loss after phase 0: over all seen classes' logits, or the new classes' only.
    loss_classes: str = "seen"

    def __post_init__(self):
        if self.strength < 0:
            raise ValueError(f"method_args.strength must be >= 0, got {self.strength}.")
        if self.importance_batch_size < 1:
            raise ValueError(
                f"method_args.importance_batch_size must be >= 1, got {self.importance_batch_size}."
            )
        check_choice("loss_classes", self.loss_classes, LOSS_CLASSES)

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        del known
        return new_logits_problem(num_new, "loss_classes", self.loss_classes)

    def importance(self, ctx: PhaseContext, variables: PyTree) -> PyTree:
        """The phase's per-parameter importance; EWC, online EWC and MAS each define theirs."""
        raise TypeError(f"{type(self).__name__} must define importance(ctx, variables).")

    def merge(
        self, method_state: dict, importance: PyTree, params: PyTree, info: PhaseInfo
    ) -> dict:
        """Default: the sum of the importances, anchored at the latest parameters."""
        del info
        if not method_state:
            return {self.importance_key: importance, "anchor": copy_tree(params)}
        merged = decayed_sum(method_state[self.importance_key], importance, params, 1.0)
        return {self.importance_key: merged["importance"], "anchor": merged["anchor"]}

    def begin_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        del ctx
        # The new head columns get zero importance (and a zero anchor): they are free to learn.
        # (A `head.capacity` head's state has every column already.)
        if not method_state:
            return method_state
        return widen_state(method_state, new_columns(method_state["anchor"], variables["params"]))

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
        del apply_fn
        logits = classified_logits(out.logits, info.num_old, self.loss_classes)
        ce = models.cross_entropy(logits, batch.y)
        if self.importance_key not in method_state:  # phase 0
            return ce, {"ce": ce}
        importance = method_state[self.importance_key]
        penalty = (
            0.5 * self.strength * quadratic_penalty(params, importance, method_state["anchor"])
        )
        return ce + penalty, {"ce": ce, "penalty": jnp.full_like(ce, penalty)}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        importance = self.importance(ctx, variables)
        return self.merge(method_state, importance, variables["params"], ctx.info)


@dataclasses.dataclass(frozen=True)
class EWC(QuadraticPenalty):
    """EWC as PyCIL runs it by default (module doc); each choice is an option."""

    name = "ewc"
    importance_key = "fisher"
    accumulations = ACCUMULATIONS

    strength: float = 1000.0  # PyCIL's lamda (models/ewc.py line 31); FACIL's lamb is 5000
    fisher: str = "batch"  # batch (PyCIL) | per_example
    fisher_batch_size: int = 128  # PyCIL's batch_size (line 27), for fisher='batch'
    fisher_max: float = 1e-4  # PyCIL's clip (line 32), for fisher='batch'; inf: no clip
    accumulate: str = "average"  # average (PyCIL) | sum (the paper)
    loss_classes: str = "new"  # PyCIL's (lines 172-174)

    def __post_init__(self):
        super().__post_init__()
        check_choice("fisher", self.fisher, FISHERS)
        check_choice("accumulate", self.accumulate, self.accumulations)
        if self.fisher_batch_size < 1:
            raise ValueError(
                f"method_args.fisher_batch_size must be >= 1, got {self.fisher_batch_size}."
            )
        if not self.fisher_max > 0:
            raise ValueError(
                f"method_args.fisher_max must be > 0 (inf for no clip), got {self.fisher_max}."
            )

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        if num_new == 0 and self.accumulate == "average":
            return (
                "accumulate='average' weighs each phase's Fisher by its share of the classes, and "
                "this phase's would weigh 0; pass --config.method_args.accumulate=sum."
            )
        return super().learn_problem(num_new, known)

    def importance(self, ctx: PhaseContext, variables: PyTree) -> PyTree:
        if self.fisher == "batch":
            return batch_fisher(ctx, variables, self.fisher_batch_size, self.fisher_max)
        return mean_over_phase_data(
            ctx, variables, squared_log_likelihood_grad, self.importance_batch_size
        )

    def merge(
        self, method_state: dict, importance: PyTree, params: PyTree, info: PhaseInfo
    ) -> dict:
        if not method_state:
            return {"fisher": importance, "anchor": copy_tree(params)}
        if self.accumulate == "average":
            merged = averaged(
                method_state["fisher"], importance, params, info.num_old, info.num_seen
            )
        else:
            merged = summed_penalties(
                method_state["fisher"], method_state["anchor"], importance, params
            )
        return {"fisher": merged["importance"], "anchor": merged["anchor"]}


@dataclasses.dataclass(frozen=True)
class OnlineEWC(EWC):
    """Online EWC with van de Ven et al.'s estimator and loss (module doc)."""

    name = "online_ewc"
    accumulations = ("online",)

    strength: float = 5000.0  # FACIL's lamb, the same (lambda / 2) form
    fisher: str = "per_example"
    accumulate: str = "online"  # the only one: gamma's running sum
    loss_classes: str = "seen"
    gamma: float = 1.0  # decay of the running Fisher; van de Ven et al.'s default (see module doc)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"method_args.gamma must be in [0, 1], got {self.gamma}.")

    def merge(
        self, method_state: dict, importance: PyTree, params: PyTree, info: PhaseInfo
    ) -> dict:
        """F <- gamma F + F_t, anchored at the latest parameters."""
        del info
        if not method_state:
            return {"fisher": importance, "anchor": copy_tree(params)}
        merged = decayed_sum(method_state["fisher"], importance, params, self.gamma)
        return {"fisher": merged["importance"], "anchor": merged["anchor"]}
