"""Parameter surgery: pure transforms of parameter pytrees.

Parameters are `{'backbone': ..., 'head': {'kernel': (D, C), 'bias': (C,)}}`. Every function here returns a
new tree and leaves its input untouched, so a tree that is still needed (a teacher) stays valid.

Leaves are named by their path, `'backbone/dense0/kernel'`, and chosen by a regex that must match the
whole path. A pattern that matches nothing, or a leaf whose shape does not fit, is an error that names
the paths, never a silent no-op.

- the head: `widen_head`, `remove_classes` (and `widen_like`, `remove_classes_like` for optimizer and
  method state shaped like the params), `narrow_head` and `fill_head` (a head with a column for every
  class, of which the first are in use);
- subtrees by path: `select`, `map_paths`, `replace`, `graft`, `graft_from_checkpoint`;
- the backbone: `add_branch`, `add_branch_like` (parallel branches whose features are concatenated);
- training: `freeze` (an optax optimizer that leaves frozen paths unchanged), `freeze_head_columns`;
- inspection: `count_params`, `summary`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from etils import epath

from incremental import checkpoint, compilation
from incremental.models import layers

PyTree = Any
FreezeRules = Sequence[tuple[str, bool]]  # (regex over "a/b/c" paths, frozen)
HEAD_INITS = ("default", "zeros", "imprint")
# The branches of a branched backbone: `backbone/branch_0`, `backbone/branch_1`, ...
BRANCH = "branch_"


def path_str(path) -> str:
    """`(DictKey('head'), DictKey('kernel'))` -> `'head/kernel'`.

    >>> tree = {'head': {'kernel': 0}}
    >>> [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    ['head/kernel']
    """
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _is_head_leaf(path) -> bool:
    return path_str(path).endswith(("head/kernel", "head/bias"))


def _leaves(tree: PyTree) -> dict[str, Any]:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _spec(leaf) -> str:
    return f"{tuple(np.shape(leaf))} {jnp.result_type(leaf)}"


def _no_match(what: str, regex: str, paths: Sequence[str]) -> ValueError:
    shown = ", ".join(list(paths)[:8]) + (", ..." if len(paths) > 8 else "")
    return ValueError(
        f"{what}: pattern {regex!r} matches no leaf path. The regex must match a whole path; the "
        f"paths are: {shown or '(none)'}."
    )


def compile_pattern(regex: str) -> re.Pattern:
    """`re.compile(regex)`, or a ValueError naming the pattern and what is wrong with it."""
    try:
        return re.compile(regex)
    except re.error as error:
        raise ValueError(f"The pattern {regex!r} is not a regular expression ({error}).") from None


def select(tree: PyTree, regex: str, *, strict: bool = False) -> dict[str, jax.Array]:
    """The leaves whose path fully matches `regex`, keyed by path.

    With `strict=True`, a pattern that matches nothing raises `ValueError` instead of returning `{}`.

    >>> params = {'backbone': {'w': jnp.ones(2)}, 'head': {'kernel': jnp.ones((2, 3))}}
    >>> list(select(params, 'head/.*'))
    ['head/kernel']
    >>> select(params, 'heads/.*', strict=True)
    Traceback (most recent call last):
    ValueError: select: pattern 'heads/.*' matches no leaf path. ...
    """
    pattern = compile_pattern(regex)
    leaves = _leaves(tree)
    found = {path: leaf for path, leaf in leaves.items() if pattern.fullmatch(path)}
    if strict and not found:
        raise _no_match("select", regex, list(leaves))
    return found


def map_paths(fn: Callable[[jax.Array], jax.Array], tree: PyTree, regex: str) -> PyTree:
    """Applies `fn` to the leaves whose path fully matches `regex`; other leaves are kept.

    >>> params = {'backbone': {'w': jnp.ones(2)}, 'head': {'bias': jnp.ones(2)}}
    >>> map_paths(lambda x: 2 * x, params, 'head/.*')['head']['bias'].tolist()
    [2.0, 2.0]
    """
    pattern = compile_pattern(regex)
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: fn(leaf) if pattern.fullmatch(path_str(p)) else leaf, tree
    )


def replace(tree: PyTree, regex: str, new: PyTree) -> PyTree:
    """Returns `tree` with the leaves whose path fully matches `regex` taken from `new`.

    `new` is either `{path: leaf}` (as `select` returns) or a tree with the same paths, e.g.
    `{'backbone': {...}}`. Every matching leaf needs a replacement of the same shape and dtype, and
    every leaf of `new` must be one of the matching leaves; anything else raises `ValueError`.

    >>> params = {'backbone': {'w': jnp.zeros(2)}, 'head': {'bias': jnp.zeros(2)}}
    >>> out = replace(params, 'backbone/.*', {'backbone/w': jnp.ones(2)})
    >>> out['backbone']['w'].tolist(), out['head']['bias'] is params['head']['bias']
    ([1.0, 1.0], True)
    >>> replace(params, 'backbone/.*', {'backbone': {'w': jnp.ones(3)}})
    Traceback (most recent call last):
    ValueError: replace: 'backbone/w' is (2,) float32 in the tree but (3,) float32 in the replacement. ...
    """
    targets = select(tree, regex, strict=True)
    values = _leaves(new)
    _check_same_paths("replace", regex, targets, values)
    _check_fit("replace", targets, {p: _spec(v) for p, v in values.items()}, "the replacement")
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: values[path_str(p)] if path_str(p) in targets else leaf, tree
    )


def _check_same_paths(what: str, regex: str, targets: Mapping, values: Mapping) -> None:
    missing = sorted(set(targets) - set(values))
    extra = sorted(set(values) - set(targets))
    if missing:
        raise ValueError(f"{what}: {regex!r} matches {missing[:8]}, which the source lacks.")
    if extra:
        raise ValueError(
            f"{what}: the source has {extra[:8]}, which {regex!r} does not match in the tree; "
            "narrow the source (select) or widen the pattern."
        )


def _check_fit(what: str, targets: Mapping, specs: Mapping[str, str], source: str) -> None:
    misfits = [
        f"{path!r} is {_spec(leaf)} in the tree but {specs[path]} in {source}"
        for path, leaf in targets.items()
        if _spec(leaf) != specs[path]
    ]
    if misfits:
        raise ValueError(
            f"{what}: {'; '.join(misfits[:8])}. Leaves must keep their shape and dtype; change "
            "shapes with widen_head, remove_classes or add_branch first."
        )


def graft(dst: PyTree, src: PyTree, regex: str) -> PyTree:
    """Returns `dst` with the leaves whose path fully matches `regex` copied from `src`.

    Both trees must have the matching paths, with the same shapes and dtypes.

    >>> student = {'backbone': {'w': jnp.zeros(2)}, 'head': {'bias': jnp.zeros(3)}}
    >>> teacher = {'backbone': {'w': jnp.ones(2)}, 'head': {'bias': jnp.ones(2)}}
    >>> graft(student, teacher, 'backbone/.*')['backbone']['w'].tolist()
    [1.0, 1.0]
    """
    return replace(dst, regex, select(src, regex, strict=True))


def graft_from_checkpoint(
    dst: PyTree,
    directory: str | os.PathLike,
    regex: str,
    *,
    step: int | None = None,
    item: str = "state",
    subtree: str | None = None,
) -> PyTree:
    """Returns `dst` with the leaves matching `regex` read from an orbax checkpoint on disk.

    Only the matching arrays are read: the others are orbax placeholders, never loaded. Shapes and
    dtypes are checked against the checkpoint's metadata before anything is read.

    Args:
      dst: the tree to graft into (params, or optimizer or method state).
      directory: a work directory (its newest `checkpoints/phase/<p>`), a `CheckpointManager`
        directory (its newest step), one step of it, or a directory written by
        `ocp.StandardCheckpointer` / `ocp.PyTreeCheckpointer`.
      regex: fully matches the paths to graft, relative to `subtree`.
      step: the step (phase) to read instead of the newest.
      item: the item of a `CheckpointManager` step (`'state'` or `'method'`).
      subtree: the path inside the saved tree that corresponds to `dst`'s root. Default: `'params'`
        for the `state` item of a work directory or manager, the root otherwise. Use
        `'opt_state'` to graft into an optimizer state.

    Returns:
      `dst` with the matching leaves replaced by the saved arrays.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> saved = {'backbone': {'w': jnp.arange(3.0)}, 'head': {'bias': jnp.ones(2)}}
    >>> with ocp.StandardCheckpointer() as ckptr:
    ...     ckptr.save(os.path.join(tmp.name, 'params'), saved)
    >>> fresh = {'backbone': {'w': jnp.zeros(3)}, 'head': {'bias': jnp.zeros(5)}}
    >>> out = graft_from_checkpoint(fresh, os.path.join(tmp.name, 'params'), 'backbone/.*')
    >>> out['backbone']['w'].tolist(), out['head']['bias'] is fresh['head']['bias']
    ([0.0, 1.0, 2.0], True)
    >>> tmp.cleanup()
    """
    directory = os.fspath(directory)
    if "://" not in directory:  # a local path may be relative (orbax wants it absolute)
        directory = os.path.abspath(directory)
    path, managed = _pytree_directory(epath.Path(directory), step, item)
    if subtree is None:
        subtree = "params" if managed and item == "state" else ""
    handler = ocp.PyTreeCheckpointHandler()
    metadata = handler.metadata(path).tree
    saved = _under(_leaves(metadata), subtree, path)
    pattern = compile_pattern(regex)
    wanted = {p: m for p, m in saved.items() if pattern.fullmatch(p)}
    if not wanted:
        raise _no_match(f"graft_from_checkpoint({str(path)!r})", regex, list(saved))
    targets = select(dst, regex)
    _check_same_paths(f"graft_from_checkpoint({str(path)!r})", regex, targets, wanted)
    on_disk = {p: f"{tuple(m.shape)} {np.dtype(m.dtype)}" for p, m in wanted.items()}
    _check_fit("graft_from_checkpoint", targets, on_disk, str(path))
    restored = _restore_only(handler, path, metadata, {_join(subtree, p) for p in wanted})
    meta_dir = path.parent / "meta"
    if managed and (meta_dir / "metadata").exists():  # a work directory's: its checksums
        meta = ocp.JsonCheckpointHandler().restore(meta_dir)
        checkpoint.verify_leaves(meta, {f"{item}/{p}": v for p, v in restored.items()})
    values = {p: jnp.asarray(restored[_join(subtree, p)]) for p in wanted}
    return replace(dst, regex, values)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def _under(leaves: dict, subtree: str, path) -> dict:
    if not subtree:
        return leaves
    head = subtree.rstrip("/") + "/"
    found = {p[len(head) :]: m for p, m in leaves.items() if p.startswith(head)}
    if not found:
        tops = sorted({p.split("/")[0] for p in leaves})
        raise ValueError(
            f"The checkpoint {path} has no subtree {subtree!r}; its top level: {tops}."
        )
    return found


def _pytree_directory(root: epath.Path, step: int | None, item: str) -> tuple[epath.Path, bool]:
    """The directory of one saved pytree, and whether it came from a `CheckpointManager` layout."""
    if not root.is_dir():
        raise ValueError(f"No checkpoint directory {root}.")
    managed = False
    if (root / "checkpoints" / "phase").is_dir():  # a work directory
        root = root / "checkpoints" / "phase"
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())
    if steps and not (root / "_METADATA").exists():
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise ValueError(f"{root} has no step {step}; it has steps {steps}.")
        root, managed = root / str(chosen), True
    elif step is not None:
        raise ValueError(f"step={step} was given but {root} is not a directory of steps.")
    if (root / item / "_METADATA").exists():
        root, managed = root / item, True
    if not (root / "_METADATA").exists():
        raise ValueError(
            f"{root} is not an orbax pytree checkpoint (no _METADATA file) and has no item "
            f"{item!r}; pass a work directory, a CheckpointManager directory or a saved pytree."
        )
    return root, managed


def _restore_only(handler, path: epath.Path, metadata: PyTree, wanted: set[str]) -> dict:
    """Restores the leaves at the `wanted` paths as numpy arrays; the rest stay on disk."""

    def target(p, meta):
        if path_str(p) in wanted:
            return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype)
        return ocp.PLACEHOLDER

    item = jax.tree_util.tree_map_with_path(target, metadata)
    restore_args = jax.tree.map(
        lambda t: ocp.RestoreArgs(restore_type=np.ndarray if t is not ocp.PLACEHOLDER else None),
        item,
    )
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
    return {p: v for p, v in _leaves(handler.restore(path, args=args)).items() if p in wanted}


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
      kernel_init: initialiser used by `'default'` (default: lecun normal, as `nn.Dense`'s).

    Returns:
      The widened tree (the input is not modified).

    >>> params = {'head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)}}
    >>> wide = widen_head(params, 3, jax.random.PRNGKey(0), 'zeros')
    >>> wide['head']['kernel'].shape, wide['head']['bias'].tolist()
    ((4, 5), [1.0, 1.0, 0.0, 0.0, 0.0])
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
        kernel_init = kernel_init or layers.lecun_normal_row
        with compilation.unrolled_threefry():  # drawn eagerly: a sampler program per shape
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

    >>> params = {'head': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)}}
    >>> state = optax.adam(1e-3).init(params)
    >>> widen_like(state, 3)[0].mu['head']['kernel'].shape
    (4, 5)
    """

    def widen(path, leaf):
        if not _is_head_leaf(path) or not hasattr(leaf, "shape"):
            return leaf
        pad = [(0, 0)] * (leaf.ndim - 1) + [(0, num_new)]
        return jnp.pad(leaf, pad, constant_values=fill)

    return jax.tree_util.tree_map_with_path(widen, tree)


def narrow_head(params: PyTree, num_classes: int) -> PyTree:
    """Returns `params` with only the first `num_classes` head columns (kernel and bias).

    The kept columns' logits are bit-identical (see `models.head_logits`); other head leaves (a
    cosine head's scale) are kept. It undoes `widen_head`.

    >>> params = {'head': {'kernel': jnp.arange(6.0).reshape(2, 3), 'bias': jnp.arange(3.0)}}
    >>> narrow_head(params, 2)['head']['kernel'].tolist()
    [[0.0, 1.0], [3.0, 4.0]]
    """
    head = params.get("head", {}) if isinstance(params, Mapping) else {}
    if np.ndim(head.get("kernel")) != 2:
        raise ValueError("narrow_head expects params['head']['kernel'] of shape (D, C).")
    width = head["kernel"].shape[-1]
    if not 1 <= num_classes <= width:
        raise ValueError(f"narrow_head: cannot keep {num_classes} of the head's {width} columns.")
    new_head = {**head, "kernel": head["kernel"][:, :num_classes]}
    if "bias" in head:
        new_head["bias"] = head["bias"][:num_classes]
    return {**params, "head": new_head}


def fill_head(params: PyTree, narrow: PyTree) -> PyTree:
    """Returns `params` with its first head columns replaced by those of `narrow`'s head.

    `narrow` is a tree like `params` whose head has no more columns; the other columns and every
    other leaf of `params` are kept. With `narrow_head`, a wide head (`head.capacity`) takes the
    columns that `widen_head` gives a narrow one:
    `fill_head(wide, widen_head(narrow_head(wide, c), k, rng))`.

    >>> wide = {'head': {'kernel': jnp.zeros((1, 4)), 'bias': jnp.zeros(4)}}
    >>> narrow = {'head': {'kernel': jnp.ones((1, 2)), 'bias': jnp.ones(2)}}
    >>> fill_head(wide, narrow)['head']['bias'].tolist()
    [1.0, 1.0, 0.0, 0.0]
    """
    head, new = params["head"], narrow["head"]
    num, width = new["kernel"].shape[-1], head["kernel"].shape[-1]
    if new["kernel"].shape[0] != head["kernel"].shape[0] or num > width:
        raise ValueError(
            f"fill_head: a head of shape {new['kernel'].shape} does not fit into one of shape "
            f"{head['kernel'].shape}."
        )
    out = {**head, "kernel": head["kernel"].at[:, :num].set(new["kernel"])}
    if "bias" in head:
        out["bias"] = head["bias"].at[:num].set(new["bias"])
    return {**params, "head": out}


def _kept_columns(classes: Sequence[int], num_classes: int) -> np.ndarray:
    array = np.asarray(classes).reshape(-1)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"Classes are column positions (integers), got {list(array)}.")
    classes = [int(c) for c in array]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"Classes {bad} are out of range for a head of {num_classes} classes.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"Classes to remove are repeated: {sorted(classes)}.")
    if len(classes) == num_classes:
        raise ValueError(f"Removing all {num_classes} classes would leave an empty head.")
    return np.setdiff1d(np.arange(num_classes), classes)


def remove_classes(params: PyTree, classes: Sequence[int]) -> PyTree:
    """Returns `params` without the head columns at the positions `classes`.

    The other columns keep their order and values, so their logits are bit-identical (the head
    computes logits in fixed-width blocks, see `models.head_logits`). A cosine head's `sigma` is
    kept. Out-of-range, repeated or all classes raise `ValueError`.

    >>> params = {'head': {'kernel': jnp.arange(8.0).reshape(2, 4), 'bias': jnp.arange(4.0)}}
    >>> out = remove_classes(params, [0, 2])
    >>> out['head']['kernel'].tolist(), out['head']['bias'].tolist()
    ([[1.0, 3.0], [5.0, 7.0]], [1.0, 3.0])
    """
    if "head" not in params or "kernel" not in params["head"]:
        raise ValueError("remove_classes expects params['head']['kernel'] of shape (D, C).")
    head = params["head"]
    keep = _kept_columns(classes, head["kernel"].shape[-1])
    new_head = {**head, "kernel": jnp.take(head["kernel"], keep, axis=-1)}
    if "bias" in head:
        new_head["bias"] = jnp.take(head["bias"], keep, axis=-1)
    return {**params, "head": new_head}


def remove_classes_like(tree: PyTree, classes: Sequence[int], num_classes: int) -> PyTree:
    """`remove_classes` for a tree shaped like the params (optimizer moments, importances).

    Leaves whose path ends in `head/kernel` or `head/bias` (as in `widen_like`) lose the entries at
    `classes` on their last axis, which must have `num_classes` entries; other leaves are kept.

    >>> params = {'head': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones(3)}}
    >>> state = optax.adam(1e-3).init(params)
    >>> remove_classes_like(state, [1], 3)[0].nu['head']['bias'].shape
    (2,)
    """
    keep = _kept_columns(classes, num_classes)

    def remove(path, leaf):
        if not _is_head_leaf(path) or not hasattr(leaf, "shape"):
            return leaf
        if leaf.ndim == 0 or leaf.shape[-1] != num_classes:
            raise ValueError(
                f"remove_classes_like: {path_str(path)!r} has shape {leaf.shape}, whose last axis "
                f"is not the {num_classes} classes."
            )
        return jnp.take(leaf, keep, axis=-1)

    return jax.tree_util.tree_map_with_path(remove, tree)


def _is_branched(node, prefix: str) -> bool:
    return (
        isinstance(node, Mapping)
        and isinstance(node.get(prefix), Mapping)
        and any(str(k).startswith(BRANCH) for k in node[prefix])
    )


def _grow(node: Mapping, new_branch_fn, feature_dim: int, fill, prefix: str, head: str) -> dict:
    """Appends a branch to `node[prefix]` and `feature_dim` rows of `fill` to `node[head]['kernel']`."""
    branches = node[prefix]
    names = [f"{BRANCH}{i}" for i in range(len([k for k in branches if k.startswith(BRANCH)]))]
    if any(name not in branches for name in names):
        raise ValueError(
            f"add_branch: the branches under {prefix!r} must be named {BRANCH}0, {BRANCH}1, ... "
            f"without gaps; found {sorted(branches)}."
        )
    out = {
        **node,
        prefix: {**branches, f"{BRANCH}{len(names)}": new_branch_fn(branches[names[-1]])},
    }
    kernel = node[head].get("kernel") if isinstance(node.get(head), Mapping) else None
    if hasattr(kernel, "shape") and kernel.ndim == 2:
        rows = jnp.full((feature_dim, kernel.shape[1]), fill, kernel.dtype)
        out[head] = {**node[head], "kernel": jnp.concatenate([kernel, rows], axis=0)}
    return out


def add_branch(
    params: PyTree,
    *,
    feature_dim: int,
    branch: PyTree | None = None,
    prefix: str = "backbone",
    head: str = "head",
) -> PyTree:
    """Appends a parallel backbone branch whose features are concatenated after the others'.

    A branched backbone is `params[prefix] = {'branch_0': ..., 'branch_1': ..., ['shared': ...]}`,
    its features the concatenation of the branches' in order. The new `branch_{k}` is `branch`, or
    a copy of the last branch; the head kernel gets `feature_dim` zero rows, so a linear head's
    logits keep their values (up to float summation order) and the old branches' features are
    untouched. Freeze the old branches with `freeze(tx, params, [('backbone/branch_0/.*', True)])`.
    The zero rows get gradients at once; the new branch does from the second step on.

    >>> params = {'backbone': {'branch_0': {'w': jnp.ones((3, 2))}},
    ...           'head': {'kernel': jnp.ones((2, 5)), 'bias': jnp.zeros(5)}}
    >>> grown = add_branch(params, feature_dim=2)
    >>> sorted(grown['backbone']), grown['head']['kernel'].shape
    (['branch_0', 'branch_1'], (4, 5))
    """
    if feature_dim < 1:
        raise ValueError(
            f"feature_dim must be >= 1 (the new branch's feature width), got {feature_dim}."
        )
    if not _is_branched(params, prefix):
        raise ValueError(
            f"add_branch expects params[{prefix!r}] = {{'{BRANCH}0': ..., ...}}; got keys "
            f"{sorted(params.get(prefix, {})) if isinstance(params, Mapping) else type(params)}."
        )
    if not isinstance(params.get(head), Mapping) or np.ndim(params[head].get("kernel")) != 2:
        raise ValueError(f"add_branch expects params[{head!r}]['kernel'] of shape (D, C).")

    def new_branch(last):
        if branch is None:  # a copy, not an alias, so that donating the params stays valid
            return jax.tree.map(lambda x: jnp.array(x, copy=True), last)
        if not jax.tree.leaves(branch):
            raise ValueError("add_branch: `branch` has no parameters; pass its params subtree.")
        return branch

    return _grow(params, new_branch, feature_dim, 0.0, prefix, head)


def add_branch_like(
    tree: PyTree,
    *,
    feature_dim: int,
    fill: float = 0.0,
    prefix: str = "backbone",
    head: str = "head",
) -> PyTree:
    """`add_branch` for a tree shaped like the params (optimizer moments, importances).

    Every params-shaped part (a dict holding a branched `prefix`) gets a new branch shaped like its
    last branch and `feature_dim` new head-kernel rows, all `fill`; other leaves are kept.

    >>> params = {'backbone': {'branch_0': {'w': jnp.ones(3)}},
    ...           'head': {'kernel': jnp.ones((2, 5)), 'bias': jnp.zeros(5)}}
    >>> state = add_branch_like(optax.adam(1e-3).init(params), feature_dim=2)
    >>> state[0].mu['backbone']['branch_1']['w'].tolist(), state[0].mu['head']['kernel'].shape
    ([0.0, 0.0, 0.0], (4, 5))
    """
    found = []

    def grow(node):
        if not _is_branched(node, prefix):
            return node
        found.append(True)
        new_branch = lambda last: jax.tree.map(lambda x: jnp.full_like(x, fill), last)
        return _grow(node, new_branch, feature_dim, fill, prefix, head)

    out = jax.tree.map(grow, tree, is_leaf=lambda node: _is_branched(node, prefix))
    if not found:
        raise ValueError(f"add_branch_like: no part of the tree has branches under {prefix!r}.")
    return out


def freeze_labels(params: PyTree, rules: FreezeRules) -> PyTree:
    """Labels each leaf `'frozen'` or `'trainable'` by the first `(regex, frozen)` rule matching its path.

    >>> params = {'backbone': {'w': jnp.ones(2)}, 'head': {'bias': jnp.ones(2)}}
    >>> freeze_labels(params, [('backbone/.*', True)])
    {'backbone': {'w': 'frozen'}, 'head': {'bias': 'trainable'}}
    """
    compiled = [(compile_pattern(regex), frozen) for regex, frozen in rules]

    def label(path, _):
        name = path_str(path)
        for pattern, frozen in compiled:
            if pattern.fullmatch(name):
                return "frozen" if frozen else "trainable"
        return "trainable"

    return jax.tree_util.tree_map_with_path(label, params)


def check_rules(params: PyTree, rules: FreezeRules, *, each: bool = True) -> None:
    """Raises `ValueError` when a rule's regex matches no leaf (`each=False`: when none matches any).

    >>> params = {'backbone': {'w': jnp.ones(2)}}
    >>> check_rules(params, [('backbone/.*', True)])
    >>> check_rules(params, [('backbone/.*', True), ('body/.*', True)])
    Traceback (most recent call last):
    ValueError: freeze rule 'body/.*' matches no leaf path. ...
    """
    paths = list(_leaves(params))
    unmatched = [r for r, _ in rules if not any(re.fullmatch(r, p) for p in paths)]
    if unmatched and (each or len(unmatched) == len(rules)):
        shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        raise ValueError(
            f"freeze rule {' and '.join(map(repr, unmatched))} matches no leaf path. A rule's "
            f"regex must match a whole path; the paths are: {shown or '(none)'}."
        )


def freeze(
    tx: optax.GradientTransformation, params: PyTree, rules: FreezeRules, *, strict: bool = False
):
    """Wraps `tx` so that leaves frozen by `rules` get zero updates and no optimizer state.

    Rules are `(regex, frozen)` pairs; the first whose regex fully matches a path decides. A
    non-empty rule list of which no rule matches any path raises `ValueError`; with `strict=True`,
    so does any single rule that matches nothing.

    >>> params = {'backbone': {'w': jnp.ones(2)}, 'head': {'bias': jnp.ones(2)}}
    >>> tx = freeze(optax.sgd(1.0), params, [('backbone/.*', True)])
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    >>> updates['backbone']['w'].tolist(), updates['head']['bias'].tolist()
    ([0.0, 0.0], [-1.0, -1.0])
    """
    if not rules:
        return tx
    check_rules(params, rules, each=strict)
    labels = freeze_labels(params, rules)
    return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def freeze_head_columns(num_frozen: int | jax.Array) -> optax.GradientTransformation:
    """Zeroes the updates of the first `num_frozen` head columns (old classes), after all else.

    Put it last in the chain so that weight decay and momentum cannot move frozen columns either.
    `num_frozen` may be traced (a hyper-parameter of `optax.inject_hyperparams`, `head.capacity`).

    >>> params = {'head': {'kernel': jnp.ones((1, 3)), 'bias': jnp.ones(3)}}
    >>> tx = optax.chain(optax.sgd(1.0), freeze_head_columns(2))
    >>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    >>> updates['head']['bias'].tolist()
    [0.0, 0.0, -1.0]
    """

    def zero_frozen(u):
        frozen = jnp.arange(u.shape[-1]) < num_frozen
        return jnp.where(frozen, jnp.zeros_like(u), u)

    def zero(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: zero_frozen(u) if _is_head_leaf(p) else u, updates
        )

    return optax.stateless(zero)


def count_params(tree: PyTree, depth: int | None = None) -> dict[str, int]:
    """Number of scalars in every subtree, keyed by path; `''` is the whole tree.

    `depth` limits the paths to that many levels (`0`: only the total; `None`: down to the leaves).

    >>> params = {'backbone': {'w': jnp.ones((3, 2))}, 'head': {'kernel': jnp.ones((2, 4)),
    ...                                                       'bias': jnp.ones(4)}}
    >>> count_params(params, depth=1)
    {'': 18, 'backbone': 6, 'head': 12}
    """
    counts: dict[str, int] = {"": 0}
    for path, leaf in _leaves(tree).items():
        size = int(np.size(leaf))
        counts[""] += size
        parts = path.split("/")
        for level in range(1, len(parts) + 1 if depth is None else min(depth, len(parts)) + 1):
            key = "/".join(parts[:level])
            counts[key] = counts.get(key, 0) + size
    return counts


def summary(params: PyTree, rules: FreezeRules = ()) -> str:
    """A printable table of every leaf: path, shape, dtype, count, and whether `rules` freeze it.

    >>> params = {'backbone': {'w': jnp.ones((3, 2))}, 'head': {'bias': jnp.ones(4)}}
    >>> print(summary(params, [('backbone/.*', True)]))
    path        shape   dtype    params  frozen
    backbone/w  (3, 2)  float32       6  yes
    head/bias   (4,)    float32       4  no
    total                            10  6 frozen, 4 trainable
    """
    labels = _leaves(freeze_labels(params, rules))
    rows = [("path", "shape", "dtype", "params", "frozen")]
    frozen = 0
    for path, leaf in _leaves(params).items():
        is_frozen = labels[path] == "frozen"
        frozen += int(np.size(leaf)) if is_frozen else 0
        shape, dtype, size = str(tuple(np.shape(leaf))), str(jnp.result_type(leaf)), np.size(leaf)
        rows.append((path, shape, dtype, f"{int(size):,}", "yes" if is_frozen else "no"))
    total = count_params(params, depth=0)[""]
    rows.append(("total", "", "", f"{total:,}", f"{frozen:,} frozen, {total - frozen:,} trainable"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        cells = [
            c.rjust(w) if i == 3 else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
