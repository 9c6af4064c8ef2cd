"""Where the test suite spends its compile time: a pytest plugin, and the summary of what it saw.

    PYTHONPATH=scripts python -m pytest -p compile_profile -p no:cacheprovider   # cold: no kept cache
    python scripts/compile_profile.py [DIR [ROWS]]                              # seconds per file

Each test process (every xdist worker) counts, per test, JAX's compiles and their seconds (tracing,
lowering, XLA), the programs read from the persistent cache, and the test's wall time, and writes
them to $COMPILE_PROFILE (default /tmp/incremental-compile-profile/<worker>.json); the same seconds
per program, by its name, the innermost line of the package or the tests that compiled it and the
test line that reached it, go to <worker>.programs beside it. Processes that tests start (the command-line tests) are not seen:
their time shows only in their test's wall time.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import sys
import time
import traceback

import pytest

from incremental import compilation

OUT = os.environ.get("COMPILE_PROFILE", "/tmp/incremental-compile-profile")
DURATIONS = dict(zip(compilation.EVENTS, ("trace", "lower", "xla"), strict=True))
COLUMNS = ("wall", "xla", "trace", "lower", "compiles", "hits")

_stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_programs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_test = ["<collection>"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _site() -> str:
    """`LINE|TEST_LINE`: the innermost line of the repository's own code (the package or the tests)
    on the stack, where an eager op ran or a jitted function was called, and the innermost line of
    the tests, the one that reached it ("?" where none is)."""
    lines = []
    for frame in reversed(traceback.extract_stack()):
        path = os.path.relpath(frame.filename, ROOT)
        if path.startswith(("incremental", "tests")) and "site-packages" not in path:
            lines.append(f"{path}:{frame.lineno}")
            if path.startswith("tests"):
                return f"{lines[0]}|{lines[-1]}"
    return f"{lines[0] if lines else '?'}|?"


def _duration(event: str, seconds: float, fun_name: str = "?", **kwargs) -> None:
    del kwargs
    if event not in DURATIONS:
        return
    kind = DURATIONS[event]
    for counts in (_stats[_test[0]], _programs[f"{fun_name} {_site()}"]):
        counts[kind] += seconds
        counts["compiles"] += kind == "xla"


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
    """Prints the totals, the test files with the longest wall time, then the programs that took
    the most compile seconds: by the name JAX compiles them under (`jit(concatenate)` is an eager
    `jnp.concatenate`), and by the line that compiled them."""
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
    by_name: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_site: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_test: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in glob.glob(os.path.join(directory, "*.programs")):
        with open(path) as f:
            for key, counts in json.load(f).items():
                name, sites = key.rsplit(" ", 1)
                site, _, test_line = sites.partition("|")
                by_name[name].update(counts)
                by_site[site].update(counts)
                by_test[test_line or "?"].update(counts)
    _table("program", by_name, rows)
    _table("where (innermost line of the package or tests)", by_site, rows)
    _table("reached from (innermost line of the tests)", by_test, rows)


def _table(title: str, counts_by: dict[str, collections.Counter], rows: int) -> None:
    print(f"\n{title[:60]:60s}" + "".join(f"{c:>9s}" for c in ("seconds", *COLUMNS[1:5])))
    for key, counts in sorted(counts_by.items(), key=lambda kv: -_compile_seconds(kv[1]))[:rows]:
        print(
            f"{key[-60:]:60s}{_compile_seconds(counts):9.1f}"
            + "".join(f"{counts[c]:9.1f}" for c in COLUMNS[1:5])
        )


if __name__ == "__main__":
    main(*sys.argv[1:2], *map(int, sys.argv[2:3]))
