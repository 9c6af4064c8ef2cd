"""Where the test suite spends its compile time: a pytest plugin, and the summary of what it saw.

    PYTHONPATH=scripts python -m pytest -p compile_profile -p no:cacheprovider   # cold: no kept cache
    python scripts/compile_profile.py                                            # seconds per file

Each test process (every xdist worker) counts, per test, JAX's compiles and their seconds (tracing,
lowering, XLA), the programs read from the persistent cache, and the test's wall time, and writes
them to $COMPILE_PROFILE (default /tmp/incremental-compile-profile/<worker>.json). Processes that
tests start (the command-line tests) are not seen: their time shows only in their test's wall time.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time

import pytest

from incremental import compilation

OUT = os.environ.get("COMPILE_PROFILE", "/tmp/incremental-compile-profile")
DURATIONS = dict(zip(compilation.EVENTS, ("trace", "lower", "xla"), strict=True))
COLUMNS = ("wall", "xla", "trace", "lower", "compiles", "hits")

_stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_programs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_test = ["<collection>"]


def _duration(event: str, seconds: float, fun_name: str = "?", **kwargs) -> None:
    del kwargs
    if event in DURATIONS:
        _stats[_test[0]][DURATIONS[event]] += seconds
        _stats[_test[0]]["compiles"] += DURATIONS[event] == "xla"
        _programs[fun_name][DURATIONS[event]] += seconds
        _programs[fun_name]["compiles"] += DURATIONS[event] == "xla"


def _event(event: str, **kwargs) -> None:
    del kwargs
    _stats[_test[0]]["hits"] += event == compilation.CACHE_HIT


def pytest_configure(config):
    del config
    import jax

    jax.monitoring.register_event_duration_secs_listener(_duration)
    jax.monitoring.register_event_listener(_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    del nextitem
    _test[0] = item.nodeid
    start = time.perf_counter()
    yield
    _stats[item.nodeid]["wall"] += time.perf_counter() - start
    _test[0] = "<between tests>"


def pytest_sessionfinish(session):
    del session
    os.makedirs(OUT, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(OUT, f"{worker}.json"), "w") as f:
        json.dump({test: dict(counts) for test, counts in _stats.items()}, f)
    with open(os.path.join(OUT, f"{worker}.programs"), "w") as f:
        json.dump({name: dict(counts) for name, counts in _programs.items()}, f)


def _compile_seconds(counts: collections.Counter) -> float:
    return counts["trace"] + counts["lower"] + counts["xla"]


def main(directory: str = OUT, rows: int = 30) -> None:
    """Prints the totals, the test files with the longest wall time, then the programs (by the
    name JAX compiles them under: `jit(concatenate)` is an eager `jnp.concatenate`) that took the
    most compile seconds."""
    per_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in glob.glob(os.path.join(directory, "*.json")):
        with open(path) as f:
            for test, counts in json.load(f).items():
                per_file[test.split("::")[0]].update(counts)
    total = sum(per_file.values(), collections.Counter())
    print("total  " + "  ".join(f"{c} {total[c]:.1f}" for c in COLUMNS))
    print(f"{'file':44s}" + "".join(f"{c:>9s}" for c in COLUMNS))
    for name, counts in sorted(per_file.items(), key=lambda kv: -kv[1]["wall"])[:rows]:
        print(f"{name:44s}" + "".join(f"{counts[c]:9.1f}" for c in COLUMNS))
    programs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in glob.glob(os.path.join(directory, "*.programs")):
        with open(path) as f:
            for name, counts in json.load(f).items():
                programs[name].update(counts)
    print(f"\n{'program':44s}" + "".join(f"{c:>9s}" for c in ("seconds", *COLUMNS[1:5])))
    for name, counts in sorted(programs.items(), key=lambda kv: -_compile_seconds(kv[1]))[:rows]:
        print(
            f"{name[:44]:44s}{_compile_seconds(counts):9.1f}"
            + "".join(f"{counts[c]:9.1f}" for c in COLUMNS[1:5])
        )


if __name__ == "__main__":
    main(*sys.argv[1:2])
