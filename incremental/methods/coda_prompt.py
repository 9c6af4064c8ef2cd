"""CODA-Prompt: Smith et al. 2023, "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning" (CVPR 2023; arXiv 2211.13218).

The pre-trained ViT is frozen. Each block of `layers` gets a prefix (`ViT(prefixes=...)`) that is a
weighted sum of prompt components: component k has a key K_k, an attention vector A_k and a prompt
P_k (length × D), and its weight for an image with query q (the frozen model's [CLS] feature,
stop-gradient) is the cosine of q ⊙ A_k to K_k. The first half of the summed prompt's tokens are the
prefix keys, the second half its values. The pool of `pool_size` components is cut into
`num_phases` equal slices: phase t trains only its own slice (the older slices enter its forward
pass with a stop-gradient, the later ones are still zero and add nothing) and at test time phase t
uses slices 0..t (the later ones zero). The phase is an input of the backbone's call, so under
`head.capacity` one program trains every phase.
Each new slice starts orthonormal to the span of the older ones (`grow`). The loss is the
cross-entropy over the phase's own classes (old logits at -inf, their head columns fixed), plus
`ortho` times the orthogonality penalty mean((T Tᵀ − I)²) of K, A and the flattened P over the
components in use. Prompts live in the params (`backbone/prompt/{keys, attention, components}`,
one row per block of `layers`), trained by `l2p.PROMPT_RULES`, the ViT's parameters at their own
paths (`nn.share_scope`).

Defaults, from the reference code (sun-hailong/LAMDA-PILOT at 2647455):
  * pool 100, prompt length 8, orthogonality weight 0 (`"prompt_param": [100, 8.0, 0.0]`,
    exps/coda_prompt.json line 28; backbone/prompt.py lines 38-43); prefixes in blocks 0-4
    (`e_layers`, line 40); the pool split over the run's phases, `pool / n_tasks` per phase
    (lines 138-140; `nb_tasks`, utils/inc_net.py line 622): set `num_phases` to the protocol's;
  * the past slices detached and the future ones dropped in training, slices 0..t at test
    (backbone/prompt.py lines 143-155); weights, sum and split as above (lines 159-170); the
    penalty (lines 173-176, 191-192);
  * query = the frozen backbone's [CLS] (utils/inc_net.py lines 628-629), feature = [CLS] of the
    prompted pass (line 631); old classes' training logits at -inf (models/coda_prompt.py line 119).
The optimiser is the run's (`config.train`); PILOT's is Adam, lr 0.001, batch 128, cosine schedule,
20 epochs, no weight decay (exps/coda_prompt.json lines 15-21); set `train.weight_decay=0`, or the
slices of past phases shrink.

Choices where implementations differ: PILOT fills a new slice by Gram-Schmidt of fresh normal
vectors against each older row in turn (backbone/prompt.py lines 69-125), which is orthogonal to
them only while they stay orthogonal to one another; here the new rows are made orthonormal to the
span of all older rows (a QR basis), as trained rows in general are not orthogonal. A phase past
`num_phases` is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import (
    Batch,
    Method,
    Outputs,
    PhaseContext,
    PhaseInfo,
    PhaseSetup,
    PyTree,
)
from incremental.methods.l2p import PROMPT_RULES, masked_logits_problem, with_prompt
from incremental.methods.ncm import l2_normalize


def orthonormal_rows(key: jax.Array, num: int, old_RxN: jax.Array) -> jax.Array:
    """`num` random unit rows (num, N), orthogonal to one another and to the span of `old`'s rows."""
    fresh = jax.random.normal(key, (num, old_RxN.shape[1]), jnp.float32)
    if old_RxN.shape[0]:
        basis, _ = jnp.linalg.qr(old_RxN.T)  # (N, R): orthonormal columns spanning the old rows
        fresh = fresh - jnp.dot(jnp.dot(fresh, basis), basis.T, precision="highest")
    rows, _ = jnp.linalg.qr(fresh.T)
    return rows.T[:num]


def fill_slice(key: jax.Array, table: jax.Array, start: int, stop: int) -> jax.Array:
    """`table` (layers, pool, ...) with rows start..stop of every layer orthonormal to rows 0..start
    (flattened past the pool axis), PILOT's `gram_schmidt`."""
    layers, pool = table.shape[:2]
    flat = table.reshape(layers, pool, -1)
    keys = jax.random.split(key, layers)
    new = jnp.stack(
        [orthonormal_rows(keys[i], stop - start, flat[i, :start]) for i in range(layers)]
    )
    return flat.at[:, start:stop].set(new).reshape(table.shape)


class Components(nn.Module):
    """`keys`, `attention` (layers, pool, D) and `components` (layers, pool, length, D); phase 0's
    slice orthonormal, the rest zero until their phase (`fill_slice`)."""

    num_layers: int
    pool_size: int
    per_phase: int
    length: int
    width: int

    def setup(self):
        def init(shape):
            zeros = jnp.zeros((self.num_layers, self.pool_size, *shape))
            return lambda key: fill_slice(key, zeros, 0, self.per_phase)

        self.keys = self.param("keys", init((self.width,)))
        self.attention = self.param("attention", init((self.width,)))
        self.components = self.param("components", init((self.length, self.width)))


class CodaPromptViT(nn.Module):
    """A ViT whose blocks `layers` get the attention-weighted sums of the components as prefixes.

    The phase is an input of the call, not a field: under `head.capacity` one program trains every
    phase. Components of later phases are zero until their phase (`grow`), so their weights and
    prompts are zero: the whole pool takes part and equals slices 0..phase.
    """

    vit: nn.Module  # models.ViT
    layers: tuple[int, ...]
    pool_size: int
    per_phase: int
    length: int

    def setup(self):
        nn.share_scope(self, self.vit)  # the ViT's parameters keep their paths
        width = self.vit.dims()[0]
        self.prompt = Components(
            len(self.layers), self.pool_size, self.per_phase, self.length, width
        )

    def in_use(self, phase: int | jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """K, A, P; in training (`phase` given) every slice but the phase's behind a
        stop-gradient (the past ones, PILOT's detach; the later ones, still zero)."""
        tables = (self.prompt.keys, self.prompt.attention, self.prompt.components)
        if phase is None:
            return tables
        return tuple(trained_slice(t, self.per_phase, phase) for t in tables)

    def __call__(
        self, x: jax.Array, *, train: bool = False, phase: int | jax.Array | None = None
    ) -> jax.Array:
        """The prompted features; in training `phase` (a Python int, or traced) is required."""
        if train and phase is None:
            raise ValueError(
                "coda_prompt trains one slice of its pool: pass the phase in training."
            )
        query_BxD = jax.lax.stop_gradient(self.vit(x)).astype(jnp.float32)
        keys, attention, components = self.in_use(phase)
        prefixes, half = {}, self.length // 2
        for i, layer in enumerate(self.layers):
            attended_BxKxD = l2_normalize(query_BxD[:, None, :] * attention[i][None])
            weights_BxK = jnp.einsum("bkd,kd->bk", attended_BxKxD, l2_normalize(keys[i]))
            prompt_BxLxD = jnp.einsum("bk,kld->bld", weights_BxK, components[i])
            prefixes[layer] = (prompt_BxLxD[:, :half], prompt_BxLxD[:, half:])
        return self.vit(x, prefixes=prefixes)


def trained_slice(table: jax.Array, per_phase: int, phase: int | jax.Array) -> jax.Array:
    """`table` (layers, pool, ...) as it is, its gradient kept for `phase`'s slice of the pool only."""
    rows = jnp.arange(table.shape[1]) // per_phase
    mine = (rows == phase).reshape(1, -1, *(1,) * (table.ndim - 2))
    return jnp.where(mine, table, jax.lax.stop_gradient(table))


def ortho_penalty(table: jax.Array, num_rows: int | jax.Array) -> jax.Array:
    """mean((T Tᵀ − I)²) over the first `num_rows` rows of a (layers, rows, ...) table, summed over
    its leading layer axis."""
    flat = table.reshape(table.shape[0], table.shape[1], -1)
    gram = jnp.einsum("lkn,ljn->lkj", flat, flat, precision="highest")
    rows = jnp.arange(flat.shape[1])
    kept = (rows[:, None] < num_rows) & (rows[None, :] < num_rows)
    squares = jnp.where(kept[None], (gram - jnp.eye(flat.shape[1])[None]) ** 2, 0.0)
    return (squares.sum(axis=(1, 2)) / (num_rows * num_rows)).sum()


@dataclasses.dataclass(frozen=True)
class CodaPrompt(Method):
    """Method state: none; the components are in the params (`backbone/prompt/...`)."""

    name = "coda_prompt"
    dynamic_phase = True  # the phase reaches the backbone as an input (`phase_input`)
    phase_input = True

    pool_size: int = 100  # PILOT exps/coda_prompt.json line 28
    length: int = 8  # prompt tokens: half prefix keys, half values (line 28)
    ortho: float = 0.0  # weight of the orthogonality penalty (line 28)
    layers: tuple[int, ...] = (0, 1, 2, 3, 4)  # backbone/prompt.py line 40
    num_phases: int = 10  # the pool's slices; PILOT: the run's number of tasks

    def __post_init__(self):
        if self.num_phases < 1 or self.pool_size % self.num_phases:
            raise ValueError(
                f"coda_prompt splits pool_size {self.pool_size} into num_phases "
                f"{self.num_phases} equal slices; make pool_size a multiple of num_phases."
            )
        if self.length < 2 or self.length % 2 or not self.layers or min(self.layers) < 0:
            raise ValueError(
                f"coda_prompt needs an even length >= 2 (prefix keys and values) and block "
                f"indices >= 0, got length {self.length}, layers {self.layers}."
            )

    @property
    def per_phase(self) -> int:
        return self.pool_size // self.num_phases

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        return masked_logits_problem(self.name, num_new, known)

    def backbone(self, make: Callable, info: PhaseInfo, *, final: bool = False):
        del final
        vit = make()
        if not isinstance(vit, models.ViT):
            raise ValueError(
                f"coda_prompt puts prefixes into a ViT's blocks; model.name must be 'vit', the "
                f"backbone is a {type(vit).__name__}."
            )
        width, depth = vit.dims()[:2]
        if max(self.layers) >= depth:
            raise ValueError(
                f"coda_prompt: layers {self.layers} must be blocks of the ViT, 0..{depth - 1}."
            )
        if self.pool_size > width:
            raise ValueError(
                f"coda_prompt: a pool of {self.pool_size} keys cannot be orthonormal in {width} "
                "dimensions; lower method_args.pool_size."
            )
        if info.phase >= self.num_phases:
            raise ValueError(
                f"coda_prompt's pool has slices for {self.num_phases} phases (method_args."
                f"num_phases), and this is phase {info.phase}; set num_phases to the protocol's."
            )
        return CodaPromptViT(vit, self.layers, self.pool_size, self.per_phase, self.length)

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        del info
        return PhaseSetup(freeze=PROMPT_RULES, freeze_old_columns=True)

    def grow(self, ctx: PhaseContext, variables: PyTree, key: jax.Array) -> PyTree:
        """Phase t's slice starts orthonormal to the span of the older slices."""
        start = ctx.info.phase * self.per_phase
        stop = start + self.per_phase
        prompt = dict(variables["params"]["backbone"]["prompt"])
        for i, name in enumerate(("keys", "attention", "components")):
            prompt[name] = fill_slice(jax.random.fold_in(key, i), prompt[name], start, stop)
        return with_prompt(variables, prompt)

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
        ce = models.cross_entropy(models.mask_old(out.logits, info.num_old), batch.y)
        if not self.ortho:
            return ce, {"ce": ce}
        tables = [  # as in the forward: the phase's slice trained, slices 0..phase counted
            trained_slice(t, self.per_phase, info.phase)
            for t in params["backbone"]["prompt"].values()
        ]
        stop = (info.phase + 1) * self.per_phase
        penalty = sum(ortho_penalty(t, stop) for t in tables)
        return ce + self.ortho * penalty, {"ce": ce, "ortho": jnp.broadcast_to(penalty, ce.shape)}
