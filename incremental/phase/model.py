"""The phase's model: the method's backbone and a head for the phase's classes, and its variables."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from incremental import capacity, compilation, models
from incremental.methods import Method, PhaseInfo
from incremental.models import build_backbone, build_model

PyTree = Any
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def named_key(key: jax.Array, name: str) -> jax.Array:
    """A key derived from `key` by name, so adding a new use of randomness never shifts the others."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def phase_key(config, phase: int) -> jax.Array:
    """The root key of a phase's randomness (init, growth, widening, batches)."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), phase)


def dtype_of(config):
    if config.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {config.dtype!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[config.dtype]


def make_model(config, num_classes: int, head: str = "linear"):
    """The config's model with a plain backbone and `num_classes` head columns."""
    kwargs = dict(config.model.kwargs.to_dict())
    return build_model(config.model.name, num_classes, head=head, dtype=dtype_of(config), **kwargs)


def train_loop(config) -> str:
    """`config.train.loop`, with 'auto' resolved: a Python loop of steps for convolutional models on
    CPU, where XLA runs convolution gradients far slower inside a scan; the scan elsewhere."""
    loop = config.train.loop
    if loop != "auto":
        return loop
    return "steps" if jax.default_backend() == "cpu" and config.model.name != "mlp" else "scan"


def phase_model(
    config,
    method: Method,
    info: PhaseInfo,
    *,
    final: bool = False,
    num_classes: int = 0,
    backbone: Callable[..., Any] | None = None,
):
    """The phase's model: the method's backbone (built from the config's) and its head's classes.

    The head has `num_classes` columns if given, else `config.head.capacity` if set, else the
    phase's `num_seen`. `backbone(make)`, if given, builds the backbone instead of the method's
    (a companion model, `Method.companions`).
    """
    dtype = dtype_of(config)
    kwargs = dict(config.model.kwargs.to_dict())

    def make(part: str = "all", **fields):
        extra = {} if part == "all" else {"part": part}
        return build_backbone(config.model.name, dtype=dtype, **{**kwargs, **fields}, **extra)

    module = backbone(make) if backbone else method.backbone(make, info, final=final)
    width = num_classes or capacity.width(config) or info.num_seen
    return models.classifier(module, width, method.head)


@functools.lru_cache(maxsize=64)
def jitted_init(model) -> Callable:
    """`model.init` as one program for every initializer (eagerly, each distinct shape would compile
    its own sampler), made once per model: an equal module built again in the process (the next
    run of a sweep, a resumed run) neither traces nor lowers it again."""
    return jax.jit(functools.partial(model.init, train=False))


def init_variables(model, x_example: np.ndarray, key: jax.Array) -> PyTree:
    """Fresh `{'params', 'batch_stats'}` of `model` for inputs shaped like `x_example`."""
    try:
        init = jitted_init(model)
    except TypeError:  # a module with an unhashable field: its own program
        init = jitted_init.__wrapped__(model)
    with compilation.unrolled_threefry():  # compiled at the first call
        variables = init(key, jnp.zeros((1, *x_example.shape), jnp.float32))
    variables = flax.core.unfreeze(variables)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
