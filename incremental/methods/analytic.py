"""Analytic class-incremental learning (ACIL): Zhuang et al. 2022, "ACIL: Analytic Class-Incremental
Learning with Absolute Memorization and Privacy Protection" (NeurIPS).

Phase 0 trains the network with SGD as usual; from then on the backbone is frozen and nothing takes a
gradient step. Features go through a fixed random "buffer layer" `h = relu(f @ P)` (P: D × E), and the
classifier is the ridge regression of one-hot labels on h over every class seen so far,

    W = (HᵀH + γI)⁻¹ HᵀY,

kept exact without old data by recursive least squares: with R = (HᵀH + γI)⁻¹ in the method state, a
phase with new features Hₙ and labels Yₙ updates (Woodbury; K = I + Hₙ R Hₙᵀ)

    R ← R − R Hₙᵀ K⁻¹ Hₙ R,        W ← [W, 0] + R Hₙᵀ (Yₙ − Hₙ [W, 0])   (R already updated).

Old examples have zero targets for the new classes, so widening W with zero columns keeps it the ridge
solution of the old data, and the update makes it the joint ridge solution on old and new data. Scores
are `h @ W`; every phase, phase 0 included, is evaluated with it.

Choices where implementations differ:
  * γ = 0.1 and the buffer's initialisation (PyTorch `Linear`'s U(−1/√D, 1/√D), no bias, then ReLU)
    are those of the authors' code (ZHUANGHP/Analytic-continual-learning, `--gamma 0.1`).
  * Buffer width E = 2048 by default, not the authors' 8192: R is E × E and is checkpointed after every
    phase (256 MiB at 8192 in float32). `expansion=0` drops the buffer (h = f).
  * R is computed directly as (HᵀH + γI)⁻¹ (Cholesky) after phase 0, where it has no predecessor,
    and by the Woodbury update afterwards. The authors' code works in float64; here everything is
    float32, in blocks of at most `BLOCK` examples (zero-padded rows change neither HᵀH nor HᵀY).
  * No bias column (the authors' default `bias=False`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np

from incremental import models
from incremental.methods.base import (
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
    PyTree,
    phase_data,
)

BLOCK = 1024  # most examples per Woodbury update: K is BLOCK × BLOCK
HIGHEST = jax.lax.Precision.HIGHEST


def expand(feats_NxD: jax.Array, method_state: dict) -> jax.Array:
    """The buffer layer: `relu(f @ P)`, or the features themselves without a projection."""
    feats_NxD = feats_NxD.astype(jnp.float32)
    if "projection" not in method_state:
        return feats_NxD
    return jax.nn.relu(jnp.dot(feats_NxD, method_state["projection"], precision=HIGHEST))


def _blocks(feats: np.ndarray, labels: np.ndarray, num_classes: int, block: int):
    """Zero-padded (num_blocks, block, D) features and (num_blocks, block, C) one-hot targets."""
    n = len(feats)
    total = -(-n // block) * block
    feats = np.concatenate([feats, np.zeros((total - n, feats.shape[1]), feats.dtype)])
    onehot = np.zeros((total, num_classes), np.float32)
    onehot[np.arange(n), labels] = 1.0
    return (
        jnp.asarray(feats, jnp.float32).reshape(-1, block, feats.shape[1]),
        jnp.asarray(onehot).reshape(-1, block, num_classes),
    )


@jax.jit
def _ridge(buffer: dict, feats_BLxNxD, onehot_BLxNxC, gamma: jax.Array):
    """R = (HᵀH + γI)⁻¹ and W = R HᵀY from scratch, by Cholesky."""
    dim = expand(feats_BLxNxD[0, :1], buffer).shape[1]

    def accumulate(carry, xy):
        gram, moment = carry
        h = expand(xy[0], buffer)
        gram = gram + jnp.dot(h.T, h, precision=HIGHEST)
        return (gram, moment + jnp.dot(h.T, xy[1], precision=HIGHEST)), None

    init = (jnp.zeros((dim, dim)), jnp.zeros((dim, onehot_BLxNxC.shape[-1])))
    (gram, moment), _ = jax.lax.scan(accumulate, init, (feats_BLxNxD, onehot_BLxNxC))
    factor = jsl.cho_factor(gram + gamma * jnp.eye(dim))
    inverse = jsl.cho_solve(factor, jnp.eye(dim))
    return 0.5 * (inverse + inverse.T), jsl.cho_solve(factor, moment)


@jax.jit
def _woodbury(buffer: dict, inverse_ExE, weight_ExC, feats_BLxNxD, onehot_BLxNxC):
    """The recursive least-squares update of R and W by each block of new examples in turn."""

    def update(carry, xy):
        inverse, weight = carry
        h_NxE = expand(xy[0], buffer)
        u_NxE = jnp.dot(h_NxE, inverse, precision=HIGHEST)  # H R
        k_NxN = jnp.eye(h_NxE.shape[0]) + jnp.dot(u_NxE, h_NxE.T, precision=HIGHEST)
        kinv_u_NxE = jsl.cho_solve(jsl.cho_factor(k_NxN), u_NxE)  # K⁻¹ H R
        inverse = inverse - jnp.dot(u_NxE.T, kinv_u_NxE, precision=HIGHEST)
        inverse = 0.5 * (inverse + inverse.T)
        # The updated R times Hᵀ is R Hᵀ K⁻¹ (Woodbury), so the W step needs no second product with R.
        residual = xy[1] - jnp.dot(h_NxE, weight, precision=HIGHEST)
        return (inverse, weight + jnp.dot(kinv_u_NxE.T, residual, precision=HIGHEST)), None

    (inverse, weight), _ = jax.lax.scan(
        update, (inverse_ExE, weight_ExC), (feats_BLxNxD, onehot_BLxNxC)
    )
    return inverse, weight


@dataclasses.dataclass(frozen=True)
class Analytic(Method):
    """Method state: `inverse_gram` R (E, E), `weight` W (E, head width: num_seen, or `head.capacity`, zero beyond num_seen) and, when `expansion > 0`,
    the buffer's `projection` P (D, E)."""

    name = "analytic"
    dynamic_phase = True

    gamma: float = 0.1  # ridge regularisation γ (the authors' code default, --gamma 0.1)
    expansion: int = 2048  # buffer width E; 0: no buffer (the authors' code uses 8192)
    seed: int = 0  # seed of the buffer's random projection

    def __post_init__(self):
        if self.gamma <= 0:
            raise ValueError(f"analytic: gamma must be > 0 (R must exist), got {self.gamma}.")
        if self.expansion < 0:
            raise ValueError(
                f"analytic: expansion is the buffer width, >= 0 (0: none), got {self.expansion}."
            )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        return PhaseSetup() if info.phase == 0 else PhaseSetup(train=False)

    def buffer(self, feature_dim: int) -> dict:
        """The buffer layer's state: a projection drawn from `seed` like PyTorch's `Linear` init."""
        if not self.expansion:
            return {}
        bound = 1.0 / np.sqrt(feature_dim)
        rng = np.random.default_rng(self.seed)
        projection = rng.uniform(-bound, bound, (feature_dim, self.expansion))
        return {"projection": jnp.asarray(projection, jnp.float32)}

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        info = ctx.info
        idx = phase_data(ctx)  # the examples the phase brings
        feats = np.asarray(ctx.embed(variables, ctx.x_train[idx]), np.float32)
        blocks = _blocks(feats, ctx.y_train[idx], info.num_seen, min(BLOCK, len(idx)))
        width = variables["params"]["head"]["kernel"].shape[-1]
        if "inverse_gram" not in method_state:
            buffer = self.buffer(feats.shape[1])
            inverse, weight = _ridge(buffer, *blocks, jnp.float32(self.gamma))
            return {**buffer, "inverse_gram": inverse, "weight": _pad_columns(weight, width)}
        old = method_state["weight"]
        if old.shape[1] < info.num_old:
            raise ValueError(
                f"analytic's head has {old.shape[1]} classes before phase {info.phase}, expected "
                f"{info.num_old}; the method state does not belong to this run."
            )
        buffer = {k: v for k, v in method_state.items() if k == "projection"}
        weight = _pad_columns(old[:, : info.num_old], info.num_seen)
        inverse, weight = _woodbury(buffer, method_state["inverse_gram"], weight, *blocks)
        return {**buffer, "inverse_gram": inverse, "weight": _pad_columns(weight, width)}

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        """`h @ W` with `h` the buffer layer's output, in the head's blocks of columns
        (`models.head_logits`), so that a `head.capacity` head's zero columns change nothing."""
        weight = method_state["weight"]
        zeros = jnp.zeros((weight.shape[1],), jnp.float32)
        return models.head_logits(
            expand(out.features, method_state), {"kernel": weight, "bias": zeros}
        )


def _pad_columns(weight_ExC: jax.Array, width: int) -> jax.Array:
    """`weight` with zero columns up to `width`: the seen classes', or a `head.capacity` head's."""
    return jnp.pad(weight_ExC, ((0, 0), (0, width - weight_ExC.shape[1])))
