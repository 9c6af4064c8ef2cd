"""Synaptic Intelligence (SI): Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic
Intelligence" (ICML), a.k.a. the path integral regulariser.

Every step adds `-g * dθ` to a running per-parameter accumulator ω, where g is the gradient of the
*unregularised* loss and dθ the parameter change the optimizer actually made (momentum and weight decay
included), so ω approximates each parameter's contribution to the drop of the phase's loss. At the end
of a phase the importance becomes Ω ← max(0, Ω + ω / ((θ_end − θ_start)² + ξ)), ω is reset and the
anchor θ* becomes the phase's final parameters. Later phases add `c Σ Ω (θ − θ*)²` to the loss.

Choices where implementations differ:
  * The path integral uses the gradient of the loss without the penalty, as the authors' code
    (`unreg_grads` in ganguli-lab/pathint) and FACIL do. The step hook receives the gradient of the
    total loss, so the penalty's exact gradient `2 c Ω (θ − θ*)` is subtracted from it.
  * Ω is clipped at zero after each phase, as the authors' code does (`tf.nn.relu` on the summed
    omega); FACIL does not clip. Momentum and weight decay can make a phase's ω negative.
  * Importances cover every parameter, the head included (the paper's single-head setting); the head
    columns of new classes start with zero importance, so they are free to learn.
  * Defaults are FACIL's (`lamb=0.1`, `damping=0.1`): c = 0.1 is also the paper's split CIFAR-10/100
    value, and ξ = 0.1 the authors' permuted-MNIST setting (their split runs use ξ = 1e-3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from incremental import models, surgery
from incremental.methods.base import (
    LOSS_CLASSES,
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PyTree,
    check_choice,
    classified_logits,
    new_logits_problem,
    static_first_phase,
)
from incremental.methods.ewc import new_columns

_copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731  (a donated tree must not alias)


@dataclasses.dataclass(frozen=True)
class SI(Method):
    """Method state: `importance` (Ω) and `anchor` (θ*) between phases; inside a phase also `omega`
    (the running path integral ω) and `start` (the parameters the phase started from)."""

    name = "si"
    dynamic_phase = True

    strength: float = 0.1  # c, weight of the penalty (FACIL's lamb; the paper's split CIFAR value)
    damping: float = 0.1  # ξ, keeps Ω finite for parameters that barely moved (FACIL's damping)
    # Cross-entropy over every seen class (the paper's single head), or the new classes' only.
    loss_classes: str = "seen"

    def __post_init__(self):
        check_choice("loss_classes", self.loss_classes, LOSS_CLASSES)
        if self.strength < 0:
            raise ValueError(f"si: strength (c) must be >= 0, got {self.strength}.")
        if self.damping <= 0:
            raise ValueError(
                f"si: damping (ξ) must be > 0 to keep Ω finite, got {self.damping}; try 0.1."
            )

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        del known
        return new_logits_problem(num_new, "loss_classes", self.loss_classes)

    def begin_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        params = variables["params"]
        if method_state:  # new head columns (none for a `head.capacity` head) start free
            num_new = new_columns(method_state["anchor"], params)
            importance = surgery.widen_like(method_state["importance"], num_new)
            anchor = surgery.widen_like(method_state["anchor"], num_new)
        else:
            importance = jax.tree.map(jnp.zeros_like, params)
            anchor = _copy(params)
        return {
            "importance": importance,
            "anchor": anchor,
            "omega": jax.tree.map(jnp.zeros_like, params),
            "start": _copy(params),
        }

    def penalty(self, params: PyTree, method_state: dict) -> jax.Array:
        """`c Σ Ω (θ − θ*)²` over every parameter."""
        terms = jax.tree.map(
            lambda p, w, a: jnp.sum(w * jnp.square(p - a)),
            params,
            method_state["importance"],
            method_state["anchor"],
        )
        return self.strength * sum(jax.tree.leaves(terms))

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
        if static_first_phase(info):  # Ω is zero: skip the penalty's cost
            return ce, {"ce": ce}
        penalty = jnp.broadcast_to(self.penalty(params, method_state), ce.shape)
        return ce + penalty, {"ce": ce, "penalty": penalty}

    def step_update(
        self, method_state: dict, *, params_before: PyTree, params_after: PyTree, grads: PyTree
    ) -> dict:
        # The penalty is added once to every example's loss, so it enters the batch mean once and its
        # gradient at params_before is exactly 2cΩ(θ − θ*); removing it leaves the loss's own gradient.
        def add(omega, g, before, after, importance, anchor):
            unreg = g - 2.0 * self.strength * importance * (before - anchor)
            return omega - unreg * (after - before)

        omega = jax.tree.map(
            add,
            method_state["omega"],
            grads,
            params_before,
            params_after,
            method_state["importance"],
            method_state["anchor"],
        )
        return {**method_state, "omega": omega}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        del ctx
        params = variables["params"]
        importance = _consolidate(
            method_state["importance"],
            method_state["omega"],
            params,
            method_state["start"],
            jnp.float32(self.damping),
        )
        return {"importance": importance, "anchor": _copy(params)}


@jax.jit
def _consolidate(importance, omega, end, start, damping):
    """Ω ← max(0, Ω + ω / ((θ_end − θ_start)² + ξ)), leaf by leaf."""
    return jax.tree.map(
        lambda big, small, e, s: jnp.maximum(big + small / (jnp.square(e - s) + damping), 0.0),
        importance,
        omega,
        end,
        start,
    )
