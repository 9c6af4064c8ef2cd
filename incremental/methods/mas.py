"""MAS: Aljundi et al. 2018, "Memory Aware Synapses: Learning what (not) to forget" (ECCV).

A parameter's importance is how much the network's output moves when it moves, measured without
labels: Omega_i = mean over the phase's training examples of |d ||f(x)||_2^2 / d theta_i|, where f(x)
are the logits of all classes seen so far (the global MAS of the paper, not its layer-wise l-MAS).
After the first phase the loss is cross-entropy over all seen classes plus the same quadratic penalty
as EWC (see `incremental.methods.ewc`), with the head widened by zero importance for new columns.

Choices where implementations differ:
- Per-example gradients, as the paper's Eq. 2 averages |g(x_k)| over examples. FACIL takes the
  gradient of the batch mean of the (unsquared) L2 norm and then its absolute value.
- Accumulation: the importances of all finished phases are summed and the anchor is the parameters at
  the end of the latest phase, as in the authors' code (MAS_utils/MAS_based_Training.py). FACIL
  instead averages them, Omega <- 0.5 Omega + 0.5 Omega_t.
- Penalty: (strength / 2) sum_i Omega_i (theta_i - theta*_i)^2, FACIL's form with its lamb = 1. The
  paper writes lambda sum_i Omega_i (theta_i - theta*_i)^2 with lambda = 1, i.e. strength = 2 here.
- Penalised parameters: backbone and old head columns (FACIL penalises only the backbone, because its
  heads are separate per task).

The squared norm makes Omega scale with the logits: on digits' MLP it reaches ~30 after phase 0 and
a few hundred after later phases, so with SGD at lr 0.05 the default strength diverges from phase 3
on (see the stability limit in `incremental.methods.ewc`); strength 0.01 runs there.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from incremental.methods.base import PhaseContext
from incremental.methods.ewc import QuadraticPenalty, mean_over_phase_data

PyTree = Any


def abs_output_norm_grad(logits_fn, params: PyTree, y: jax.Array) -> PyTree:
    """One example's MAS term: |d ||f(x)||_2^2 / d theta| (the label is not used)."""
    del y
    grads = jax.grad(lambda p: jnp.sum(jnp.square(logits_fn(p))))(params)
    return jax.tree.map(jnp.abs, grads)


@dataclasses.dataclass(frozen=True)
class MAS(QuadraticPenalty):
    name = "mas"
    importance_key = "omega"

    strength: float = (
        1.0  # FACIL's lamb (after the authors' notebook), with the 1/2 of FACIL's penalty
    )

    def importance(self, ctx: PhaseContext, variables: PyTree) -> PyTree:
        return mean_over_phase_data(
            ctx, variables, abs_output_norm_grad, self.importance_batch_size
        )
