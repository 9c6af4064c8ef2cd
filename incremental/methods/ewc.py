"""EWC and online EWC: a quadratic penalty that holds parameters important for past phases in place.

`ewc`: Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (PNAS).
`online_ewc`: Schwarz et al. 2018, "Progress & Compress: A scalable framework for continual learning"
(ICML), in the online form of its EWC penalty that van de Ven et al. also use.

For phases after the first, the loss is cross-entropy over all seen classes plus

    (strength / 2) * sum_i F_i (theta_i - theta*_i)^2

over every parameter: the backbone and the head. The head's importance and anchor are widened with
zeros at the start of each phase (`surgery.widen_like`), so the new columns are free and the old
columns are held. The penalty is added to every example's loss; the step averages over examples, so it
counts once per step.

Choices where implementations differ:
- Fisher: the diagonal empirical Fisher, the mean over the phase's training examples of the squared
  per-example gradient of log p(y | x) at the true label, computed at the end of the phase with the
  final parameters and BatchNorm in inference mode. FACIL squares whole-batch gradients and by default
  uses the predicted label ('max_pred'); PyCIL also squares batch gradients and clips at 1e-4.
- Penalised parameters: all of them, old head columns included (PyCIL does too); FACIL's EWC
  penalises only the backbone because its heads are separate per task.
- Classification loss: cross-entropy over all seen classes, as the paper trains its single network on
  the new task's loss. FACIL and PyCIL use cross-entropy over the new classes' logits only.
- Accumulation over phases (`ewc`): the paper's sum of one penalty per finished phase, each at its own
  anchor. As the paper notes, a sum of quadratic penalties is itself one quadratic penalty: with
  F = sum_t F_t and the Fisher-weighted anchor theta* = sum_t F_t theta*_t / F, the gradient is that
  of the sum and the value differs by a constant. The state therefore holds one `fisher` and one
  `anchor`, whatever the number of phases. (FACIL instead averages, F <- alpha F + (1 - alpha) F_t
  with alpha = 0.5, anchored at the latest parameters: that is `online_ewc` with gamma = 0.5 and
  half the strength.)
- Accumulation (`online_ewc`): one running Fisher F <- gamma F + F_t, anchored at the parameters at
  the end of the latest phase. Progress & Compress also multiplies the penalty's Fisher by gamma,
  which is a rescaling of the strength; we do not.
- Strength: FACIL's lamb = 5000 for both (class-incremental CIFAR-100 from scratch, same (lambda/2)
  form); PyCIL uses 1000. gamma = 1.0 is the default of van de Ven et al.'s implementation
  (github.com/GMvandeVen/continual-learning, `--gamma`); Schwarz et al. introduce gamma < 1 to let old
  phases fade, with a value tuned per domain.

Two practical limits, both properties of the method rather than of this code:
- The empirical Fisher vanishes where the phase's training data are fit almost perfectly (the
  gradient of log p(y | x) goes to 0 as p(y | x) goes to 1). On digits with 30 epochs per phase it is
  ~1e-6, and `ewc` ends where `finetune` does.
- With SGD, a quadratic penalty is stable only while lr * strength * importance_i < 2 (1 + momentum)
  for every parameter; beyond that the run stops with a non-finite loss. Importances summed over
  phases grow, so a strength that is stable in phase 1 may not be in phase 4. Lower the strength (or
  the learning rate) when that happens.
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

from incremental import surgery
from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    data_of_classes,
)
from incremental.methods.distill import copy_tree

PyTree = Any
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
    if ctx.apply_fn is None or ctx.normalize is None:
        raise ValueError(
            "This method needs PhaseContext.apply_fn and PhaseContext.normalize; build the context "
            "as incremental.run.train_phase does."
        )
    if batch_size < 1:
        raise ValueError(f"The importance batch size must be >= 1, got {batch_size}.")
    idx = data_of_classes(ctx.y_train, ctx.info.num_old, ctx.info.num_seen)
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
    return _mean_fn(ctx.apply_fn, ctx.normalize, example_fn)(variables, x, y, weight)


@functools.lru_cache(maxsize=16)  # the same model and rule again reuse the compiled function
def _mean_fn(apply_fn: Callable, normalize: Callable, example_fn: ExampleFn) -> Callable:
    """Jitted `(variables, x_NxB, y_NxB, weight_NxB) -> weighted mean of example_fn`."""

    @jax.jit
    def mean(variables, x_NxB, y_NxB, weight_NxB):
        batch_stats = variables.get("batch_stats", {})

        def one(params, x, y):
            def logits_fn(p):
                variables_p = {"params": p, "batch_stats": batch_stats}
                _, logits_1xC = apply_fn(variables_p, normalize(x[None]), train=False)
                return logits_1xC[0]

            return example_fn(logits_fn, params, y)

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


@dataclasses.dataclass(frozen=True)
class QuadraticPenalty(Method):
    """Cross-entropy plus (strength / 2) sum_i w_i (theta_i - theta*_i)^2 after the first phase.

    Subclasses say how a phase's importance `w` is estimated (`importance`) and how it is merged with
    the earlier ones (`merge`); the state is `{importance_key: tree, 'anchor': tree}`.
    """

    name = "quadratic_penalty"
    importance_key = "importance"

    strength: float = 1.0
    importance_batch_size: int = 64  # examples per vmapped batch of per-example gradients (memory)

    def __post_init__(self):
        if self.strength < 0:
            raise ValueError(f"method_args.strength must be >= 0, got {self.strength}.")
        if self.importance_batch_size < 1:
            raise ValueError(
                f"method_args.importance_batch_size must be >= 1, got {self.importance_batch_size}."
            )

    def importance(self, ctx: PhaseContext, variables: PyTree) -> PyTree:
        """The phase's per-parameter importance; EWC, online EWC and MAS each define theirs."""
        raise TypeError(f"{type(self).__name__} must define importance(ctx, variables).")

    def merge(self, method_state: dict, importance: PyTree, params: PyTree) -> dict:
        """Default: the sum of the importances, anchored at the latest parameters."""
        if not method_state:
            return {self.importance_key: importance, "anchor": copy_tree(params)}
        merged = decayed_sum(method_state[self.importance_key], importance, params, 1.0)
        return {self.importance_key: merged["importance"], "anchor": merged["anchor"]}

    def begin_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        del variables
        # The new head columns get zero importance (and a zero anchor): they are free to learn.
        return widen_state(method_state, ctx.info.num_new) if method_state else method_state

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
        ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch.y)
        if info.phase == 0 or self.importance_key not in method_state:
            return ce, {"ce": ce}
        importance = method_state[self.importance_key]
        penalty = (
            0.5 * self.strength * quadratic_penalty(params, importance, method_state["anchor"])
        )
        return ce + penalty, {"ce": ce, "penalty": jnp.full_like(ce, penalty)}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        return self.merge(method_state, self.importance(ctx, variables), variables["params"])


@dataclasses.dataclass(frozen=True)
class EWC(QuadraticPenalty):
    name = "ewc"
    importance_key = "fisher"

    strength: float = 5000.0  # FACIL's lamb (class-incremental CIFAR-100); PyCIL uses 1000

    def importance(self, ctx: PhaseContext, variables: PyTree) -> PyTree:
        return mean_over_phase_data(
            ctx, variables, squared_log_likelihood_grad, self.importance_batch_size
        )

    def merge(self, method_state: dict, importance: PyTree, params: PyTree) -> dict:
        """The paper's sum of per-phase penalties, kept as one penalty with a Fisher-weighted anchor."""
        if not method_state:
            return {"fisher": importance, "anchor": copy_tree(params)}
        merged = summed_penalties(
            method_state["fisher"], method_state["anchor"], importance, params
        )
        return {"fisher": merged["importance"], "anchor": merged["anchor"]}


@dataclasses.dataclass(frozen=True)
class OnlineEWC(EWC):
    name = "online_ewc"

    gamma: float = 1.0  # decay of the running Fisher; van de Ven et al.'s default (see module doc)

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"method_args.gamma must be in [0, 1], got {self.gamma}.")

    def merge(self, method_state: dict, importance: PyTree, params: PyTree) -> dict:
        """F <- gamma F + F_t, anchored at the latest parameters."""
        if not method_state:
            return {"fisher": importance, "anchor": copy_tree(params)}
        merged = decayed_sum(method_state["fisher"], importance, params, self.gamma)
        return {"fisher": merged["importance"], "anchor": merged["anchor"]}
