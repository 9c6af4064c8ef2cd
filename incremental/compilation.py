"""Compilation: JAX's persistent compilation cache, and the seconds spent compiling.

Phases recompile when the head widens (seconds for a ResNet train step on CPU). With the persistent
cache a second run, or a resumed one, reads the compiled programs from disk instead. Importing this
module also lowers JAX's random hash without loops on CPU (`unroll_threefry`).
"""

from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

from incremental.data import sources

# Tracing to a jaxpr, lowering to StableHLO, and compiling (or reading the cache) with XLA.
EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
CACHE_HIT = "/jax/compilation_cache/cache_hits"


def use_cache(setting: str) -> str | None:
    """Turns on the persistent cache in `setting` ("auto": $INCREMENTAL_COMPILE_CACHE if set, else
    $INCREMENTAL_CACHE/jax; "": off).

    Every program is cached, however fast it compiled; returns the directory, or None when off. The
    directory is not pruned (a digits run adds about 1 MB); delete it to reclaim the space.
    """
    if not setting:
        return None
    directory = setting
    if setting == "auto":
        directory = os.environ.get("INCREMENTAL_COMPILE_CACHE") or os.path.join(
            sources.cache_root(), "jax"
        )
    if jax.config.jax_compilation_cache_dir != directory:
        jax.config.update("jax_compilation_cache_dir", directory)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        compilation_cache.reset_cache()  # JAX reads the directory at its first compile otherwise
    return directory


class CompileTimer:
    """Counts the seconds JAX spends compiling, and the programs read from the persistent cache.

    with CompileTimer() as timer:
        ...
    timer.seconds, timer.cache_hits
    """

    def __init__(self):
        self.seconds = 0.0
        self.cache_hits = 0

    def _duration(self, event: str, seconds: float, **kwargs) -> None:
        del kwargs
        if event in EVENTS:
            self.seconds += seconds

    def _event(self, event: str, **kwargs) -> None:
        del kwargs
        if event == CACHE_HIT:
            self.cache_hits += 1

    def __enter__(self) -> CompileTimer:
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)


def unroll_threefry() -> bool:
    """Lowers JAX's threefry hash on CPU as straight-line code, the way JAX lowers it elsewhere.

    On CPU JAX makes each use of the hash (every key split, fold-in and draw) a loop of 5 rounds,
    which XLA:CPU compiles as a computation of its own, apart from the fusions around it: a tiny
    ViT's init (40 parameters) compiled in 1.9 s with the loops and 1.5 s without them (4.9 s and
    1.5 s under the classic fusion emitters the tests use), and 4M normals drew 2.7x faster. The hash
    is integer arithmetic, so every number drawn stays the same to the bit. Returns whether it
    applied: a JAX that no longer keeps the rule where it was read keeps its own lowering.
    """
    try:
        from jax._src.random import threefry2x32
        from jax.interpreters import mlir
    except ImportError:
        return False
    rule = getattr(threefry2x32, "_threefry2x32_lowering_rule", None)
    primitive = getattr(threefry2x32, "threefry2x32_p", None)
    if rule is None or primitive is None:
        return False
    mlir.register_lowering(primitive, rule, platform="cpu")
    return True


unroll_threefry()
