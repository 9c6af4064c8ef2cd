"""DualPrompt: Wang et al. 2022, "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning" (ECCV 2022; arXiv 2204.04799).

The pre-trained ViT is frozen. Two kinds of prompts enter it by prefix-tuning, as keys and values
put in front of a block's attention keys and values (`ViT(prefixes=...)`):
  * the G-prompt, shared by all phases, in the blocks `g_layers`;
  * the E-prompts, one per phase (a pool of `pool_size`, each with a key), in the blocks `e_layers`.
Training phase t uses E-prompt t and pulls its key toward the queries (the frozen model's [CLS]
feature, stop-gradient) of the phase's images; at test time each image takes the E-prompt whose key
is closest to its query. The feature is the [CLS] token; the loss is the cross-entropy over the
phase's own classes (old logits at -inf, their head columns fixed) minus `pull` times the chosen
key's cosine to the query. As in `l2p` (whose `PromptedViT` mechanics this reuses), the prompts are
parameters under `backbone/prompt/` with the ViT's parameters at their own paths (`nn.share_scope`),
trained by the freeze rules `l2p.PROMPT_RULES`, and `loss` recomputes the cosines through
`apply_fn(..., method=...)`, a forward pass XLA merges with the backbone's.

Defaults, from the reference code (sun-hailong/LAMDA-PILOT at 2647455, exps/dualprompt.json):
  * G-prompt length 5 in layers 0-1 (`g_prompt_length`, `g_prompt_layer_idx`, lines 34-35), E-prompt
    length 5 in layers 2-4 (`length`, `e_prompt_layer_idx`, lines 39, 44), both prefix-tuned
    (lines 36, 40) with separate keys and values (`same_key_value` false, line 57): a prompt of
    length L gives L key and L value tokens per layer (backbone/prompt.py lines 241-247;
    backbone/vit_dualprompt.py lines 213-225);
  * E-prompt pool 10, top-1 (`size`, `top_k`, lines 43, 45); all prompts and keys U(-1, 1)
    (lines 46-48);
  * training phase t uses E-prompt t (`use_prompt_mask`, line 49; backbone/vit_dualprompt.py lines
    571-579), and past the pool the closest one; E-prompt t starts as a copy of E-prompt t - 1
    (`shared_prompt_pool`, line 50; models/dualprompt.py lines 126-142), its key does not
    (`shared_prompt_key` false, line 51);
  * feature = [CLS] (`head_type` "token", line 26); surrogate weight 0.1 (line 56); old classes'
    training logits at -inf (models/dualprompt.py lines 175-176).
The optimiser is the run's (`config.train`); PILOT's is Adam, lr 0.001, batch 24, constant
schedule, 5 epochs, no weight decay (lines 16-23). Set `train.weight_decay=0` as PILOT does:
weight decay shrinks every trainable prompt and key at every step, those no image selects included.

Choices where implementations differ: the test-time choice is per example (PILOT's
`batchwise_prompt`, line 52, gives the whole batch its most frequent choice); prompt parameters are
stored as (layers, 2, length, D) rather than (layers, 2, length, heads, D / heads): the same numbers,
split into heads by the attention (`models.vit.split_heads`).
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
from incremental.methods.l2p import (
    PROMPT_RULES,
    masked_logits_problem,
    new_class_ce_and_cosines,
    uniform_init,
    with_prompt,
)
from incremental.methods.ncm import l2_normalize


class DualPrompts(nn.Module):
    """`g` (G layers, 2, g_length, D), `e` (pool, E layers, 2, e_length, D), `keys` (pool, D)."""

    num_g_layers: int
    num_e_layers: int
    g_length: int
    e_length: int
    pool_size: int
    width: int

    def setup(self):
        d = self.width
        self.g = self.param("g", uniform_init, (self.num_g_layers, 2, self.g_length, d))
        shape = (self.pool_size, self.num_e_layers, 2, self.e_length, d)
        self.e = self.param("e", uniform_init, shape)
        self.keys = self.param("keys", uniform_init, (self.pool_size, d))


class DualPromptViT(nn.Module):
    """A ViT with the G-prompt in `g_layers` and an E-prompt in `e_layers`: in training the phase's
    (`phase`, an input of the call: under `head.capacity` one program trains every phase; the
    closest past the pool), the closest to the query otherwise."""

    vit: nn.Module  # models.ViT
    g_layers: tuple[int, ...]
    e_layers: tuple[int, ...]
    g_length: int
    e_length: int
    pool_size: int

    def setup(self):
        nn.share_scope(self, self.vit)  # the ViT's parameters keep their paths
        width = self.vit.dims()[0]
        self.prompt = DualPrompts(
            len(self.g_layers),
            len(self.e_layers),
            self.g_length,
            self.e_length,
            self.pool_size,
            width,
        )

    def match(self, x: jax.Array) -> jax.Array:
        """(B, pool) cosines of each E-prompt's key to the query, the frozen model's [CLS]."""
        query_BxD = jax.lax.stop_gradient(self.vit(x)).astype(jnp.float32)
        keys_PxD = l2_normalize(self.prompt.keys)
        return jnp.dot(l2_normalize(query_BxD), keys_PxD.T, precision=jax.lax.Precision.HIGHEST)

    def chosen(self, x: jax.Array, phase: int | jax.Array | None) -> jax.Array:
        """(B,) the E-prompt of each image: the phase's in training (`phase` given), within the
        pool; the closest to the query otherwise."""
        closest = lambda module: jnp.argmax(jax.lax.stop_gradient(module.match(x)), axis=-1)  # noqa: E731
        if phase is None:
            return closest(self)
        own = lambda module: jnp.full((x.shape[0],), phase, jnp.int32)  # noqa: E731
        if isinstance(phase, int):
            return own(self) if phase < self.pool_size else closest(self)
        return nn.cond(phase < self.pool_size, own, closest, self)

    def prefixes(self, x: jax.Array, phase) -> dict[int, tuple[jax.Array, jax.Array]]:
        """{layer: (keys_BxLxD, values_BxLxD)} of the G- and the chosen E-prompts."""
        b = x.shape[0]
        out = {}
        for i, layer in enumerate(self.g_layers):
            g = jnp.broadcast_to(self.prompt.g[i][None], (b, *self.prompt.g[i].shape))
            out[layer] = (g[:, 0], g[:, 1])
        e_BxLx2xTxD = self.prompt.e[self.chosen(x, phase)]
        for i, layer in enumerate(self.e_layers):
            out[layer] = (e_BxLx2xTxD[:, i, 0], e_BxLx2xTxD[:, i, 1])
        return out

    def __call__(
        self, x: jax.Array, *, train: bool = False, phase: int | jax.Array | None = None
    ) -> jax.Array:
        """The prompted features; in training `phase` (a Python int, or traced) is required."""
        if train and phase is None:
            raise ValueError("dualprompt trains the phase's E-prompt: pass the phase in training.")
        return self.vit(x, prefixes=self.prefixes(x, phase))


@dataclasses.dataclass(frozen=True)
class DualPrompt(Method):
    """Method state: none; the prompts are in the params (`backbone/prompt/{g, e, keys}`)."""

    name = "dualprompt"
    dynamic_phase = True  # the phase reaches the backbone as an input (`phase_input`)
    phase_input = True

    g_layers: tuple[int, ...] = (0, 1)  # PILOT exps/dualprompt.json line 35
    e_layers: tuple[int, ...] = (2, 3, 4)  # line 39
    g_length: int = 5  # line 34
    e_length: int = 5  # line 44
    pool_size: int = 10  # line 43
    pull: float = 0.1  # line 56

    def __post_init__(self):
        layers = (*self.g_layers, *self.e_layers)
        if len(set(layers)) != len(layers) or min(layers, default=0) < 0:
            raise ValueError(
                f"dualprompt: g_layers {self.g_layers} and e_layers {self.e_layers} must be distinct "
                "block indices >= 0."
            )
        if min(self.g_length, self.e_length, self.pool_size) < 1 or not self.e_layers:
            raise ValueError(
                "dualprompt needs g_length, e_length and pool_size >= 1 and at least one E layer."
            )

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        return masked_logits_problem(self.name, num_new, known)

    def backbone(self, make: Callable, info: PhaseInfo, *, final: bool = False):
        del final
        vit = make()
        if not isinstance(vit, models.ViT):
            raise ValueError(
                f"dualprompt puts prefixes into a ViT's blocks; model.name must be 'vit', the "
                f"backbone is a {type(vit).__name__}."
            )
        depth = vit.dims()[1]
        if max(*self.g_layers, *self.e_layers) >= depth:
            raise ValueError(
                f"dualprompt: g_layers {self.g_layers} and e_layers {self.e_layers} must be blocks "
                f"of the ViT, 0..{depth - 1}; set method_args.g_layers and e_layers."
            )
        return DualPromptViT(
            vit,
            self.g_layers,
            self.e_layers,
            self.g_length,
            self.e_length,
            self.pool_size,
        )

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        del info
        return PhaseSetup(freeze=PROMPT_RULES, freeze_old_columns=True)

    def grow(self, ctx: PhaseContext, variables: PyTree, key: jax.Array) -> PyTree:
        """E-prompt t starts as E-prompt t - 1 (PILOT's `shared_prompt_pool`)."""
        del key
        t = ctx.info.phase
        if not 0 < t < self.pool_size:
            return variables
        prompt = variables["params"]["backbone"]["prompt"]
        return with_prompt(variables, {**prompt, "e": prompt["e"].at[t].set(prompt["e"][t - 1])})

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
        del method_state
        ce, cosine_BxP = new_class_ce_and_cosines(out, batch, params, info, apply_fn)
        own = cosine_BxP[:, jnp.minimum(info.phase, self.pool_size - 1)]  # a traced phase too
        pulled = jnp.where(info.phase < self.pool_size, own, cosine_BxP.max(axis=-1))
        return ce - self.pull * pulled, {"ce": ce, "key_cosine": pulled}
