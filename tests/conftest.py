"""Strict JAX, a temporary data cache, a kept compile cache and small shared fixtures for tests.

`python -m pytest` is the everyday suite; `python -m pytest -m ""` (what `.ci/run` calls) adds the
long end-to-end checks marked `slow` (killing runs at many points, several processes as hosts).
"""

import atexit
import collections
import json
import os
import shutil
import sys
import tempfile

# Tests never write the user's ~/.cache/incremental: generated data goes to one temporary directory
# for the whole session, shared by every test and the processes they start. The first pytest
# process makes it; pytest-xdist's workers inherit its environment and share it (the data cache
# writes its files atomically; a JAX entry read while another process writes it is compiled again),
# and only the process that made it removes it.
OWN_CACHE = "INCREMENTAL_TEST_CACHE" not in os.environ
if OWN_CACHE:
    os.environ["INCREMENTAL_TEST_CACHE"] = tempfile.mkdtemp(prefix="incremental-tests-")
    atexit.register(shutil.rmtree, os.environ["INCREMENTAL_TEST_CACHE"], ignore_errors=True)
    os.environ.pop("INCREMENTAL_COMPILE_CACHE", None)  # never the user's; see pytest_configure
os.environ["INCREMENTAL_CACHE"] = os.environ["INCREMENTAL_TEST_CACHE"]

# XLA:CPU compiles with its classic fusion emitters about 20 % faster than with the newer MLIR ones.
# Every method's digits run keeps its accuracies to the bit under them (`XLA_FLAGS=... python
# scripts/golden.py --quick --check=tests/golden/digits_quick.json`, the file recorded with XLA's
# defaults), tests/test_golden.py checks every float of three methods' runs, and four methods' final
# losses (bic, foster, mas, wa) move in the 8th digit. Compiling is most of the suite's time, so
# tests and the processes they start (which inherit XLA_FLAGS) compile this way;
# `scripts/golden.py --check` runs the defaults. LLVM at -O1 or -O0 would compile faster still
# but changes bits between a program and its wider twin (test_online and test_models catch it).
# XLA:CPU also splits a program's LLVM module into parts compiled on threads of their own: with
# the two test workers already on the two cores, one part costs 7-10 % less CPU (the code is the same).
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests derive their configs from the real ones in configs/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

jax.config.update("jax_numpy_rank_promotion", "raise")

# Compiled programs outlive the session: XLA compiling the tests' programs is half the suite's time,
# so they are kept in pytest's own cache directory (.pytest_cache/d/incremental-jax, under the
# checkout; `pytest --cache-clear` empties it), and a second run reads them instead of compiling
# (on 2 CPU cores the everyday suite took 8:39 cold, 4:11 warm). JAX's cache key is the program
# with its compile options, jax/jaxlib versions and device, so an edit only adds entries; the
# newest COMPILED_BYTES are kept.
COMPILED_BYTES = 1 << 30


def keep_newest(directory: str, limit: int) -> None:
    """Removes the oldest files of `directory` until the rest hold at most `limit` bytes."""
    entries = sorted(
        (e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(directory) if e.is_file()
    )
    total = sum(size for _, size, _ in entries)
    for _, size, path in entries:
        if total <= limit:
            break
        os.remove(path)
        total -= size


@pytest.hookimpl(trylast=True)  # after `--cache-clear` has emptied pytest's cache
def pytest_configure(config):
    """Programs compile into pytest's kept directory ($INCREMENTAL_COMPILE_CACHE, which the
    workers and the processes tests start inherit; JAX's cache keys depend on its path, so the
    path stays the same from session to session)."""
    kept = os.environ.get("INCREMENTAL_COMPILE_CACHE")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        if kept:  # a worker's --cache-clear removed what its controller made
            os.makedirs(kept, exist_ok=True)
        return
    if not OWN_CACHE or not hasattr(config, "cache"):
        return  # a given cache or no cacheprovider: compile into the session's temporary cache
    try:
        compiled = str(config.cache.mkdir("incremental-jax"))
        keep_newest(compiled, COMPILED_BYTES)
    except OSError:  # a read-only checkout
        return
    os.environ["INCREMENTAL_COMPILE_CACHE"] = compiled


@pytest.fixture(scope="session", autouse=True)
def _temporary_files(tmp_path_factory):
    """The libraries' temporary files go to the session's temporary directory, removed at its end,
    not to /tmp (tfds makes a `tmp*tfds` directory for every dataset it looks up offline and leaves
    it there), in the test processes and in those they start ($TMPDIR). pytest's own `tmp_path`
    directories stay where pytest keeps them."""
    tmp_path_factory.getbasetemp()  # fixed before the change below
    directory = os.path.join(os.environ["INCREMENTAL_TEST_CACHE"], "tmp")
    os.makedirs(directory, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:  # undone at the session's end
        patch.setattr(tempfile, "tempdir", directory)
        patch.setenv("TMPDIR", directory)
        yield


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


# The two workers take whole files (`--dist loadfile`), each the next one in collection order when it
# is free, so the longest files go first and the short ones fill the end: otherwise a long file
# started last (the multi-host test, 27 s) left one worker alone for half a minute. SECONDS holds
# each file's seconds, its everyday and its slow tests apart, from a full run on 2 cores
# (`python -m pytest -m "" --record-seconds` rewrites it); a file not in it counts as NEW_FILE.
SECONDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seconds.json")
NEW_FILE = 10.0


def pytest_addoption(parser):
    parser.addoption(
        "--record-seconds", action="store_true", help=f"rewrite {SECONDS} from this run's times"
    )


def _part(slow: bool) -> str:
    return "slow" if slow else "everyday"


@pytest.hookimpl(trylast=True)  # after `-m` has deselected
def pytest_collection_modifyitems(config, items):
    try:
        with open(SECONDS) as f:
            seconds = json.load(f)
    except FileNotFoundError:
        return
    parts = {(item.nodeid.split("::")[0], _part(item.get_closest_marker("slow") is not None))
             for item in items}  # fmt: skip
    cost = collections.Counter()
    for path, part in parts:
        cost[path] += seconds.get(path, {}).get(part, NEW_FILE)
    items.sort(key=lambda item: -cost[item.nodeid.split("::")[0]])  # stable within a file


_recorded = collections.defaultdict(collections.Counter)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    _recorded[path][_part("slow" in report.keywords)] += report.duration


def pytest_sessionfinish(session):
    if session.config.getoption("record_seconds") and not os.environ.get("PYTEST_XDIST_WORKER"):
        table = {path: {k: round(v, 1) for k, v in sorted(parts.items())}
                 for path, parts in sorted(_recorded.items())}  # fmt: skip
        with open(SECONDS, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
