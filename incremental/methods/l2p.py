"""L2P: Wang et al. 2022, "Learning to Prompt for Continual Learning" (CVPR 2022; arXiv 2112.08654).

The pre-trained ViT is frozen; what learns is a pool of prompts, each with a key, and the head. An
image's query is the frozen model's [CLS] feature (no prompts, `stop_gradient`); the `top_n` keys
closest to it by cosine pick the prompts, whose `length` tokens each are put in front of the
sequence (`ViT(prompts=...)`), and the feature is the mean of the prompt tokens' outputs. The loss is
the cross-entropy over the phase's own classes (old classes' logits at -inf) minus `pull` times the
sum of the selected keys' cosines to the query, the surrogate loss that pulls the keys to the
queries of the images that select them.

How it sits in this project: `backbone(make, info)` wraps the configured ViT in `PromptedViT`, which
shares the ViT's parameter scope (`nn.share_scope`), so the ViT's parameters keep their paths
(`backbone/embedding`, `backbone/Transformer/...`) and the pool adds `backbone/prompt/{keys,
prompts}`. The freeze rules `backbone/prompt/.*` trainable, the rest of `backbone/.*` frozen (the
project's regex rules, `PhaseSetup.freeze`), leave prompts, keys and head to the optimizer. The step
hands `loss` only the features and logits, so `loss` recomputes the key-query cosines with
`apply_fn(..., method=...)` (`PromptedViT.match`): the same frozen forward pass on the same inputs
inside the same jitted step, with a stop-gradient, so there is no second backward pass, and XLA's
common-subexpression elimination merges it with the backbone's (tests/test_pretrained_methods.py
compares the compiled step's flops).

Defaults, from the reference code (sun-hailong/LAMDA-PILOT at 2647455, exps/l2p.json):
  * pool size 10, prompt length 5, top-N 5 (`size`, `length`, `top_k`, lines 34-36);
  * prompts and keys initialised U(-1, 1) (`initializer`, `prompt_key_init` "uniform", lines 37-39;
    backbone/prompt.py lines 400-411);
  * query = the frozen model's [CLS] (`embedding_key` "cls", line 44); feature = the mean of the
    prompt tokens' outputs (`head_type` "prompt", line 26; backbone/vit_l2p.py lines 496-498);
  * surrogate weight 0.1 (`pull_constraint_coeff`, line 47), on the per-example sum of the
    selected keys' cosines (`reduce_sim`, backbone/prompt.py lines 475-479; models/l2p.py line 180);
  * training logits of old classes at -inf (models/l2p.py lines 175-176), their head columns fixed;
  * frozen: blocks, patch embedding, [CLS], norm, positions (`freeze`, line 27).
The optimiser is the run's (`config.train`); PILOT's is Adam, lr 0.001875, batch 16, constant
schedule, 5 epochs, no weight decay (lines 16-23). Set `train.weight_decay=0` as PILOT does: weight
decay shrinks every trainable prompt and key at every step, those no image selects included.

Not yet: `model.pretrained` loads into `params/backbone` as a whole (`phase.pretrained.with_backbone`)
and refuses this backbone, whose `prompt/...` the checkpoint lacks ("prompt/keys is missing from
the checkpoint"); it must load the ViT's part and keep `prompt/` as initialised (the same holds for
`dualprompt` and `coda_prompt`).

Choices where implementations differ:
  * Selection is per example. PILOT (`batchwise_prompt` true, line 43) and the official code replace
    each example's top-N by the N prompts chosen most often in the batch, at test time too, which
    makes a prediction depend on the other images of its batch; the paper's Eq. 3 is per example.
  * Prompts go in front of [CLS] after the position embeddings and get no position of their own
    (google-research/l2p `models/vit.py`, `ViT(prompts=...)`); PILOT's timm port gives them learned
    positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from incremental import models
from incremental.methods.base import Batch, Method, Outputs, PhaseInfo, PhaseSetup, PyTree
from incremental.methods.ncm import l2_normalize

PROMPT_RULES = (("backbone/prompt/.*", False), ("backbone/.*", True))  # first match decides


def _uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


# U(-1, 1), PyTorch's `nn.init.uniform_(p, -1, 1)` of PILOT's prompts and keys, drawn as one vector
# and reshaped (the same numbers, fewer axes to compile).
uniform_init = models.layers.drawn_reshaped(_uniform, models.layers.flat)


class PromptPool(nn.Module):
    """`keys` (pool, D) and `prompts` (pool, length, D)."""

    pool_size: int
    length: int
    width: int

    def setup(self):
        self.keys = self.param("keys", uniform_init, (self.pool_size, self.width))
        shape = (self.pool_size, self.length, self.width)
        self.prompts = self.param("prompts", uniform_init, shape)


class PromptedViT(nn.Module):
    """A ViT whose input gets the `top_n` prompts of the pool whose keys best match its query."""

    vit: nn.Module  # models.ViT
    pool_size: int
    length: int
    top_n: int

    def setup(self):
        nn.share_scope(self, self.vit)  # the ViT's parameters keep their paths
        self.prompt = PromptPool(self.pool_size, self.length, self.vit.dims()[0])

    def match(self, x: jax.Array) -> jax.Array:
        """(B, pool) cosines of each key to the query, the frozen model's [CLS] feature."""
        query_BxD = jax.lax.stop_gradient(self.vit(x)).astype(jnp.float32)
        keys_PxD = l2_normalize(self.prompt.keys)
        return jnp.dot(l2_normalize(query_BxD), keys_PxD.T, precision=jax.lax.Precision.HIGHEST)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """The mean output (B, D) of the selected prompts' tokens."""
        del train
        _, idx_BxN = jax.lax.top_k(jax.lax.stop_gradient(self.match(x)), self.top_n)
        prompts = self.prompt.prompts[idx_BxN]  # (B, N, length, D)
        b, n, length, d = prompts.shape
        tokens = self.vit(x, prompts=prompts.reshape(b, n * length, d), tokens=True)
        return tokens[:, : n * length].mean(axis=1)


def new_class_ce_and_cosines(out, batch, params, info, apply_fn) -> tuple[jax.Array, jax.Array]:
    """The cross-entropy over the new classes' logits (the old ones masked) and each example's
    cosine to every key (`match_scores`, the frozen query), as the key-query methods' losses use."""
    ce = models.cross_entropy(models.mask_old(out.logits, info.num_old), batch.y)
    return ce, apply_fn({"params": params}, batch.x, train=False, method=match_scores)


def with_prompt(variables: PyTree, prompt: dict) -> PyTree:
    """`variables` with `params/backbone/prompt` replaced by `prompt`."""
    backbone = {**variables["params"]["backbone"], "prompt": prompt}
    return {**variables, "params": {**variables["params"], "backbone": backbone}}


def masked_logits_problem(name: str, num_new: int, known: bool) -> str | None:
    """`Method.learn_problem` of a prompt method whose training logits of old classes are -inf."""
    if num_new and not known:
        return None
    return (
        f"{name} trains with the logits of every class learned before the phase at -inf (PILOT's "
        "masking), so examples of known classes would have no logit to learn from; bring "
        "examples of new classes only."
    )


def match_scores(module: nn.Module, x: jax.Array, train: bool = False) -> jax.Array:
    """`Classifier.apply(..., method=match_scores)`: the backbone's key-query cosines."""
    del train
    return module.backbone.match(x)


@dataclasses.dataclass(frozen=True)
class L2P(Method):
    """Method state: none; the pool is in the params (`backbone/prompt/{keys, prompts}`)."""

    name = "l2p"
    dynamic_phase = True

    pool_size: int = 10  # PILOT exps/l2p.json line 34
    length: int = 5  # tokens per prompt, line 35
    top_n: int = 5  # prompts per image, line 36
    pull: float = 0.1  # weight of the surrogate key loss, line 47

    def __post_init__(self):
        if min(self.pool_size, self.length, self.top_n) < 1 or self.top_n > self.pool_size:
            raise ValueError(
                f"l2p needs pool_size >= top_n >= 1 and length >= 1, got pool_size "
                f"{self.pool_size}, top_n {self.top_n}, length {self.length}."
            )

    def learn_problem(self, num_new: int, known: bool) -> str | None:
        return masked_logits_problem(self.name, num_new, known)

    def backbone(self, make: Callable, info: PhaseInfo, *, final: bool = False):
        del info, final
        vit = make()
        if not isinstance(vit, models.ViT):
            raise ValueError(
                f"l2p puts prompts into a ViT's input; model.name must be 'vit', the backbone is a "
                f"{type(vit).__name__}."
            )
        return PromptedViT(vit, self.pool_size, self.length, self.top_n)

    def setup(self, info: PhaseInfo) -> PhaseSetup:
        del info
        # Old classes' logits are masked, so their columns get no gradient; freezing them also keeps
        # them from a weight decay PILOT does not use (its `weight_decay` is 0, line 19).
        return PhaseSetup(freeze=PROMPT_RULES, freeze_old_columns=True)

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
        pulled = jax.lax.top_k(cosine_BxP, self.top_n)[0].sum(axis=-1)
        return ce - self.pull * pulled, {"ce": ce, "key_cosine": pulled / self.top_n}
