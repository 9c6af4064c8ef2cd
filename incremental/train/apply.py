"""Applying a model to host data in fixed-size batches (evaluation, embeddings)."""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from incremental import models, parallel
from incremental.data import device
from incremental.methods import Outputs
from incremental.train.step import apply_any_head

CHUNK = 16  # batches per call of an applied function at most
KEPT = 64  # functions `make_apply_batches` keeps for equal arguments

_kept: collections.OrderedDict = collections.OrderedDict()


def make_apply_batches(
    model: nn.Module,
    norm: device.Normalizer,
    fn: Callable[[Outputs, dict], jax.Array],
    dtype=jnp.float32,
    *,
    mask: bool = False,
) -> Callable:
    """Returns a jitted `(variables, method_state, x_NBx...) -> fn(outputs)` over batches with `lax.map`.

    `mask=True` (a head with a column for every class, `head.capacity`): the function takes a
    fourth argument, `num_seen`, and the scores of the classes from `num_seen` on are -inf (the
    logits before `fn`, and `fn`'s class scores after it).

    Equal arguments give the same function, and so its traces and programs: a later run in the
    process (of a sweep, say) neither traces nor lowers its evaluation again. `fn` is equal to
    another when both are the same method of equal objects (`method.predict`), or functions of
    the same code without free variables (`lambda out, _: out.features`).
    """
    key = reuse_key(model, norm, fn, dtype, mask)
    if key is None:
        return build_apply_batches(model, norm, fn, dtype, mask)
    if key not in _kept:
        _kept[key] = build_apply_batches(model, norm, fn, dtype, mask)
        if len(_kept) > KEPT:
            _kept.popitem(last=False)
    _kept.move_to_end(key)
    return _kept[key]


def reuse_key(model, norm: device.Normalizer, fn: Callable, dtype, mask: bool):
    """What makes `make_apply_batches`' function, as a hashable key; None when it has none."""
    if inspect.ismethod(fn):
        fn_key = (fn.__self__, fn.__func__)
    elif inspect.isfunction(fn) and not fn.__closure__:
        fn_key = fn.__code__
    else:
        return None
    stats = tuple((a.shape, str(a.dtype), a.tobytes()) for a in map(np.asarray, norm))
    key = (model, stats, fn_key, jnp.dtype(dtype).name, mask)
    try:
        hash(key)
    except TypeError:  # a module or method with an unhashable field
        return None
    return key


def build_apply_batches(model, norm, fn, dtype, mask: bool) -> Callable:
    """`make_apply_batches`' function, made anew."""

    @jax.jit
    def apply_batches(variables, method_state, x_batches, num_seen=None):
        def one(x):
            x = device.normalize(x, norm, dtype)
            feats, logits = apply_any_head(model, variables, x, train=False)
            logits = logits.astype(jnp.float32)
            if mask:
                logits = models.mask_unseen(logits, num_seen)
            scores = fn(Outputs(feats, logits), method_state)
            return models.mask_unseen(scores, num_seen) if mask else scores

        return jax.lax.map(one, x_batches)

    return apply_batches


def run_batched(
    apply_batches: Callable, variables, method_state, x: np.ndarray, batch_size: int, *args
):
    """Applies a `make_apply_batches` function to host data in fixed-size batches; returns numpy.

    The batches go in calls of `CHUNK` batches, the last one's count rounded up to a power of two
    (`chunk_sizes`), so that data of any size (a class's examples, a phase's test set) runs one of
    a few compiled programs. `args` follow the batches (a masked function's `num_seen`).
    """
    batches, n = device.padded_batches(x, batch_size)
    mesh = parallel.mesh_of(variables)
    outs, start = [], 0
    for size in chunk_sizes(len(batches)):
        chunk = batches[start : start + size]
        if len(chunk) < size:  # the last: its first batch again, to a power of two
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), axis=0)])
        if mesh is not None and jax.process_count() > 1:  # every input must span the processes
            chunk = parallel.replicate(chunk, mesh)
        outs.append(apply_batches(variables, method_state, chunk, *args))
        start += size
    out = np.concatenate([parallel.to_host(o) for o in outs])
    return out.reshape(-1, *out.shape[2:])[:n]


def chunk_sizes(num_batches: int) -> list[int]:
    """The calls' batch counts for `num_batches`: `CHUNK` each, the last a power of two (at most
    half of it padding)."""
    whole, rest = divmod(num_batches, CHUNK)
    return [CHUNK] * whole + ([1 << (rest - 1).bit_length()] if rest else [])
