"""Compilation: JAX's persistent compilation cache, and the seconds spent compiling.

Phases recompile when the head widens (seconds for a ResNet train step on CPU). With the persistent
cache a second run, or a resumed one, reads the compiled programs from disk instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


_unrolled_depth = [0]  # blocks of `unrolled_threefry` open (they nest)


@contextlib.contextmanager
def unrolled_threefry() -> Iterator[None]:
    """Within the block, programs lowered for CPU hash with JAX's threefry without loops, the way
    JAX lowers it on GPU and TPU. For parameter inits, whose every draw is a hash of its own.

    On CPU JAX lowers each use of the hash (every key split, fold-in and draw) as a loop of 5
    rounds, which XLA:CPU compiles as a computation of its own. An init draws once per parameter:
    a tiny ViT's (40 parameters) compiled in 1.9 s with the loops and 1.5 s without (4.9 s and 1.5 s
    under the classic fusion emitters the tests use). A training step is the other way round: its
    few draws feed large fusions, and unrolled they compiled 1.5-4x slower (DER++'s epoch 1.7 s
    with loops, 7 s without), so the loops come back after the block. The hash is integer
    arithmetic: every number drawn is the same to the bit either way. Where this JAX no longer
    keeps both rules where they are read, the block changes nothing.
    """
    try:
        from jax._src.random import threefry2x32
        from jax.interpreters import mlir
    except ImportError:
        yield
        return
    primitive = getattr(threefry2x32, "threefry2x32_p", None)
    unrolled = getattr(threefry2x32, "_threefry2x32_lowering_rule", None)
    rolled = getattr(threefry2x32, "_threefry2x32_cpu_lowering_rule", None)
    if primitive is None or unrolled is None or rolled is None:
        yield
        return
    if not _unrolled_depth[0]:
        mlir.register_lowering(primitive, unrolled, platform="cpu")
    _unrolled_depth[0] += 1
    try:
        yield
    finally:
        _unrolled_depth[0] -= 1
        if not _unrolled_depth[0]:  # the outermost block restores the loops
            mlir.register_lowering(primitive, rolled, platform="cpu")
