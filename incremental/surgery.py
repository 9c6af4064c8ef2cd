"""Parameter surgery: pure transforms of parameter pytrees.

Parameters are `{'backbone': ..., 'head': {'kernel': (D, C), 'bias': (C,)}}`. Every function here returns a
new tree and leaves its input untouched, so a tree that is still needed (a teacher) stays valid.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

PyTree = Any
FreezeRules = Sequence[tuple[str, bool]]  # (regex over "a/b/c" paths, frozen)
HEAD_INITS = ("default", "zeros", "imprint")


def path_str(path) -> str:
    """`(DictKey('head'), DictKey('kernel'))` -> `'head/kernel'`."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _is_head_leaf(path) -> bool:
    return path_str(path).endswith(("head/kernel", "head/bias"))


def select(tree: PyTree, regex: str) -> dict[str, jax.Array]:
    """The leaves whose path fully matches `regex`, keyed by path."""
    pattern = re.compile(regex)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves if pattern.fullmatch(path_str(p))}


def map_paths(fn: Callable[[jax.Array], jax.Array], tree: PyTree, regex: str) -> PyTree:
    """Applies `fn` to the leaves whose path fully matches `regex`; other leaves are kept."""
    pattern = re.compile(regex)
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: fn(leaf) if pattern.fullmatch(path_str(p)) else leaf, tree
    )


def widen_head(
    params: PyTree,
    num_new: int,
    rng: jax.Array,
    init: str = "default",
    *,
    class_means: jax.Array | None = None,
    kernel_init: Callable | None = None,
) -> PyTree:
    """Returns `params` with `num_new` head columns appended; old columns are bit-identical.

    Args:
      params: a parameter tree with `params['head'] = {'kernel': (D, C), 'bias': (C,)}`.
      num_new: number of columns to add.
      rng: key for the new columns (used by `init='default'`).
      init: `'default'` draws from `kernel_init` (the head's own initialiser, so a new column is
        distributed like a freshly built layer's), `'zeros'`, or `'imprint'` (weight imprinting: new
        columns are the L2-normalised `class_means`, scaled to the mean norm of the old columns).
      class_means: (num_new, D) mean features of the new classes; required for `'imprint'`.
      kernel_init: initialiser used by `'default'` (default: lecun normal, as `nn.Dense`).

    Returns:
      The widened tree (the input is not modified).
    """
    if init not in HEAD_INITS:
        raise ValueError(f"Unknown head init {init!r}; choose one of {HEAD_INITS}.")
    if num_new < 0:
        raise ValueError(f"num_new must be >= 0, got {num_new}.")
    if "head" not in params or "kernel" not in params["head"]:
        raise ValueError("widen_head expects params['head']['kernel'] of shape (D, C).")
    kernel = params["head"]["kernel"]
    dim = kernel.shape[0]
    if num_new == 0:
        return {**params, "head": dict(params["head"])}
    if init == "default":
        kernel_init = kernel_init or nn.initializers.lecun_normal()
        new_kernel = kernel_init(rng, (dim, num_new), kernel.dtype)
    elif init == "zeros":
        new_kernel = jnp.zeros((dim, num_new), kernel.dtype)
    else:
        new_kernel = _imprint(kernel, class_means, num_new)
    head = {**params["head"], "kernel": jnp.concatenate([kernel, new_kernel], axis=1)}
    if "bias" in head:
        bias = head["bias"]
        head["bias"] = jnp.concatenate([bias, jnp.zeros((num_new,), bias.dtype)])
    return {**params, "head": head}  # other head leaves (a cosine head's scale) are kept


def _imprint(kernel: jax.Array, class_means: jax.Array | None, num_new: int) -> jax.Array:
    if class_means is None or class_means.shape != (num_new, kernel.shape[0]):
        raise ValueError(
            f"init='imprint' needs class_means of shape ({num_new}, {kernel.shape[0]}), got "
            f"{None if class_means is None else class_means.shape}."
        )
    unit = class_means / jnp.linalg.norm(class_means, axis=1, keepdims=True).clip(1e-12)
    scale = jnp.linalg.norm(kernel, axis=0).mean() if kernel.shape[1] else 1.0
    return (unit * scale).T.astype(kernel.dtype)


def widen_like(tree: PyTree, num_new: int, fill: float = 0.0) -> PyTree:
    """Widens every head leaf of a tree shaped like the params (optimizer moments, importances).

    Leaves whose path ends in `head/kernel` or `head/bias` get `num_new` entries of `fill` appended on
    their last axis; everything else, including optimizer step counts, is returned as it is.
    """

    def widen(path, leaf):
        if not _is_head_leaf(path) or not hasattr(leaf, "shape"):
            return leaf
        pad = [(0, 0)] * (leaf.ndim - 1) + [(0, num_new)]
        return jnp.pad(leaf, pad, constant_values=fill)

    return jax.tree_util.tree_map_with_path(widen, tree)


def freeze_labels(params: PyTree, rules: FreezeRules) -> PyTree:
    """Labels each leaf `'frozen'` or `'trainable'` by the first `(regex, frozen)` rule matching its path."""
    compiled = [(re.compile(regex), frozen) for regex, frozen in rules]

    def label(path, _):
        name = path_str(path)
        for pattern, frozen in compiled:
            if pattern.fullmatch(name):
                return "frozen" if frozen else "trainable"
        return "trainable"

    return jax.tree_util.tree_map_with_path(label, params)


def freeze(tx: optax.GradientTransformation, params: PyTree, rules: FreezeRules):
    """Wraps `tx` so that leaves frozen by `rules` get zero updates and no optimizer state."""
    if not rules:
        return tx
    labels = freeze_labels(params, rules)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def freeze_head_columns(num_frozen: int) -> optax.GradientTransformation:
    """Zeroes the updates of the first `num_frozen` head columns (old classes), after all else.

    Put it last in the chain so that weight decay and momentum cannot move frozen columns either.
    """

    def zero(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u.at[..., :num_frozen].set(0) if _is_head_leaf(p) else u, updates
        )

    return optax.stateless(zero)
