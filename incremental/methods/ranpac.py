"""RanPAC: McDonnell et al. 2023, "RanPAC: Random Projections and Pre-trained Models for Continual
Learning" (NeurIPS 2023; arXiv 2307.02251).

Phase 0 may adapt the backbone to the data (`adapt_first_phase`); from then on nothing takes a
gradient step. Features f go through a fixed random projection with a nonlinearity,
`h = relu(f @ W_rand)` (W_rand: D × M, standard normal), and the classifier is the ridge regression
of one-hot labels on h over every class seen so far. The second-order statistics

    G = Σ hᵀh  (M × M, the Gram matrix),      Q = Σ hᵀy  (M × classes)

are accumulated phase by phase over the new examples only (old examples have zero targets for new
classes, so Q's new columns need no old data), and W = (G + λI)⁻¹ Q is solved again after each phase.
Scores are the cosine of h to each class's column of W.

Defaults and choices, from the reference code (sun-hailong/LAMDA-PILOT at 2647455):
  * M = 10000 (`"M": 10000`, exps/ranpac.json line 27); W_rand = `torch.randn(D, M)`
    (models/ranpac.py line 60); h = `relu(f @ W_rand)` (line 47, and utils/inc_net.py line 580).
  * G and Q accumulated across phases (models/ranpac.py lines 48-49), W solved directly from them,
    `solve(G + λI, Q)` (line 51). PILOT does both on the CPU in float32; here h is computed on the
    device and G, Q and the solve are float64 on the host, because G's condition number reaches
    1e7 at the small λ the search picks (6e6 at λ = 1 on digits): float32 rounding of G alone moves
    W by 4% there. The method state holds G and Q as pairs of float32 arrays (hi + lo), so they
    survive float32 devices and checkpoints to about 1e-14.
  * λ re-selected every phase (`optimise_ridge_parameter`, lines 66-78): each of 10⁻⁸ … 10⁸ is fitted
    on the first 80% of the phase's examples (their G and Q alone) and scored by the mean squared
    error on the other 20%; the best one solves the accumulated system. `ridge > 0` fixes λ instead.
    PILOT's split is in its shuffled loader's order; here in a permutation drawn from `seed`; one
    eigendecomposition serves the whole grid.
  * Scores: PILOT's `CosineLinear` (backbone/linears.py line 58) with W's columns as its rows;
    its scale σ = 1 does not change the argmax and is left out.
  * First-phase adaptation: PILOT trains a parameter-efficient adapter (AdaptFormer, `ffn_num` 64,
    20 epochs of SGD lr 0.01, exps/ranpac.json lines 16-21) in phase 0 and then freezes it. The ViT
    here has no adapter module yet, so `adapt_first_phase=True` trains the whole model in phase 0
    with the run's `train_first` settings, as `analytic` does; `False` keeps the pre-trained
    backbone as it is (RanPAC's "no first-session adaptation" ablation).

Where `analytic` does the same maths: `analytic.expand` is this method's projection layer
(`relu(f @ P)` with P in the method state's `projection`). `analytic` keeps R = (G + γI)⁻¹ for one
fixed γ and updates it recursively by Woodbury (`analytic._woodbury`); that recursion gives this
method's W when λ is fixed (`ridge > 0`), and is not used here because PILOT's λ changes every phase,
which the inverse of one fixed system cannot follow; the recursion here is G ← G + HₙᵀHₙ,
Q ← [Q, 0] + HₙᵀYₙ. G is M × M either way (2 × 400 MB at M = 10000, checkpointed with the method
state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from incremental import models
from incremental.methods.analytic import expand
from incremental.methods.base import (
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
    PyTree,
    phase_data,
)
from incremental.methods.ncm import l2_normalize

BLOCK = 2048  # examples projected per device call
RIDGES = tuple(10.0**e for e in range(-8, 9))  # PILOT's search grid (models/ranpac.py line 67)
VALIDATION_SPLIT = 0.8  # PILOT: the first 80% fit, the rest score (models/ranpac.py line 68)


def moments(buffer: dict, feats: np.ndarray, onehot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """G = Σ hᵀh and Q = Σ hᵀy in float64, h = relu(f @ W_rand) projected on the device in blocks."""
    dim = buffer["projection"].shape[1]
    gram, moment = np.zeros((dim, dim)), np.zeros((dim, onehot.shape[1]))
    for lo in range(0, len(feats), BLOCK):
        h = project(buffer, feats[lo : lo + BLOCK])
        gram += h.T @ h
        moment += h.T @ onehot[lo : lo + BLOCK]
    return gram, moment


def project(buffer: dict, feats_NxD: np.ndarray) -> np.ndarray:
    """h (N, M) in float64, from one compiled program for every N <= BLOCK (zero rows padded)."""
    padded = np.zeros((BLOCK, feats_NxD.shape[1]), np.float32)
    padded[: len(feats_NxD)] = feats_NxD
    return np.asarray(_project(buffer, jnp.asarray(padded)), np.float64)[: len(feats_NxD)]


@jax.jit
def _project(buffer: dict, feats_NxD: jax.Array) -> jax.Array:
    return expand(feats_NxD, buffer)


def solve(gram: np.ndarray, moment: np.ndarray, ridge: float) -> np.ndarray:
    """W = (G + λI)⁻¹ Q in float64 (PILOT: `torch.linalg.solve`, models/ranpac.py line 51), through
    G's eigendecomposition, which stays accurate where the search picks a λ far below G's largest
    eigenvalue (G + λI with a condition number of 1e17, where Cholesky's answer is noise)."""
    eigenvalues, vectors = np.linalg.eigh(gram)
    inverse = 1.0 / (np.maximum(eigenvalues, 0.0) + ridge)  # G is PSD: below 0 is rounding
    return vectors @ (inverse[:, None] * (vectors.T @ moment))


def select_ridge(buffer: dict, feats: np.ndarray, onehot: np.ndarray, seed: int) -> float:
    """PILOT's λ: the grid value whose fit on 80% of the phase's examples predicts the one-hot
    targets of the other 20% with the least mean squared error. One eigendecomposition of the fit's
    G serves every λ: (G + λI)⁻¹ Q = V diag(1 / (e + λ)) Vᵀ Q."""
    order = np.random.default_rng(seed).permutation(len(feats))
    cut = int(len(feats) * VALIDATION_SPLIT)
    fit, held = order[:cut], order[cut:]
    gram, moment = moments(buffer, feats[fit], onehot[fit])
    eigenvalues, vectors = np.linalg.eigh(gram)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    rotated = vectors.T @ moment
    h_held = np.concatenate(
        [project(buffer, feats[held[i : i + BLOCK]]) for i in range(0, len(held), BLOCK)]
    )
    h_held = h_held @ vectors
    errors = [
        np.mean((h_held @ (rotated / (eigenvalues + r)[:, None]) - onehot[held]) ** 2)
        for r in RIDGES
    ]
    return RIDGES[int(np.argmin(errors))]


def split(x: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """A float64 array as two float32 ones whose sum gives it back to about 1e-14."""
    hi = x.astype(np.float32)
    return jnp.asarray(hi), jnp.asarray((x - hi).astype(np.float32))


def joined(hi: jax.Array, lo: jax.Array) -> np.ndarray:
    return np.asarray(hi, np.float64) + np.asarray(lo, np.float64)


@dataclasses.dataclass(frozen=True)
class RanPAC(Method):
    """Method state: `projection` W_rand (D, M); G (M, M) as `gram` + `gram_lo` and Q (M, head width)
    as `moment` + `moment_lo` (float64 values as float32 pairs, `split`); `weight` W (M, head
    width, zero past the seen classes) and `ridge` λ of the last solve (a scalar)."""

    name = "ranpac"
    dynamic_phase = True
    train_keys = ()
    eval_keys = ("projection", "weight")

    projection_dim: int = 10000  # M (PILOT exps/ranpac.json line 27)
    ridge: float = 0.0  # λ; 0: selected every phase from 1e-8..1e8 as PILOT does
    adapt_first_phase: bool = True  # train the whole model in phase 0 (PILOT: an adapter)
    seed: int = 0  # seed of W_rand and of the λ search's split

    def __post_init__(self):
        if self.projection_dim < 1:
            raise ValueError(f"ranpac: projection_dim must be >= 1, got {self.projection_dim}.")
        if self.ridge < 0:
            raise ValueError(f"ranpac: ridge must be >= 0 (0: selected), got {self.ridge}.")

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        if info.phase == 0 and self.adapt_first_phase:
            return PhaseSetup()
        return PhaseSetup(train=False)

    def random_projection(self, feature_dim: int) -> jax.Array:
        """W_rand (D, M), standard normal, drawn from `seed`."""
        key = jax.random.PRNGKey(self.seed)
        return jax.random.normal(key, (feature_dim, self.projection_dim), jnp.float32)

    def end_phase(self, ctx: PhaseContext, variables: PyTree, method_state: dict) -> dict:
        info = ctx.info
        idx = phase_data(ctx)
        feats = np.asarray(ctx.embed(variables, ctx.x_train[idx]), np.float32)
        width = variables["params"]["head"]["kernel"].shape[-1]
        onehot = np.eye(width)[ctx.y_train[idx]]
        if "gram" in method_state:
            buffer = {"projection": method_state["projection"]}
            gram = joined(method_state["gram"], method_state["gram_lo"])
            moment = joined(method_state["moment"], method_state["moment_lo"])
            moment = np.pad(moment, ((0, 0), (0, width - moment.shape[1])))
        else:
            buffer = {"projection": self.random_projection(feats.shape[1])}
            gram = np.zeros((self.projection_dim, self.projection_dim))
            moment = np.zeros((self.projection_dim, width))
        new_gram, new_moment = moments(buffer, feats, onehot)
        gram, moment = gram + new_gram, moment + new_moment
        ridge = self.ridge or select_ridge(buffer, feats, onehot, self.seed + 7919 * info.phase)
        (gram_hi, gram_lo), (moment_hi, moment_lo) = split(gram), split(moment)
        return {
            **buffer,
            "gram": gram_hi,
            "gram_lo": gram_lo,
            "moment": moment_hi,
            "moment_lo": moment_lo,
            "weight": jnp.asarray(solve(gram, moment, ridge), jnp.float32),
            "ridge": jnp.float32(ridge),
        }

    def predict(self, out: Outputs, method_state: dict) -> jax.Array:
        """Cosine of `h = relu(f @ W_rand)` to each class's column of W, in the head's blocks of
        columns (`models.head_logits`), so a `head.capacity` head's zero columns change nothing."""
        h_BxM = l2_normalize(expand(out.features, method_state))
        weight_MxC = l2_normalize(method_state["weight"], axis=0)
        zeros = jnp.zeros((weight_MxC.shape[1],), jnp.float32)
        return models.head_logits(h_BxM, {"kernel": weight_MxC, "bias": zeros})


def _pad_columns(weight_MxC: jax.Array, width: int) -> jax.Array:
    """`weight` with zero columns up to `width` (the head widened since the last phase)."""
    return jnp.pad(weight_MxC, ((0, 0), (0, width - weight_MxC.shape[1])))
