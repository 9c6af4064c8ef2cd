"""Strict JAX for every test, a temporary cache, and small shared fixtures.

`python -m pytest` is the everyday suite; `python -m pytest -m ""` (what `.ci/run` calls) adds the
long end-to-end checks marked `slow` (killing runs at many points, several processes as hosts).
"""

import atexit
import os
import shutil
import sys
import tempfile

# Tests never write the user's ~/.cache/incremental: generated data and compiled programs go to one
# temporary directory for the whole session, shared by every test and the processes they start, so
# a program compiled by one test is read from the persistent cache by the next. The first pytest
# process makes it; pytest-xdist's workers inherit its environment and share it (JAX and the data
# cache write their files atomically), and only the process that made it removes it.
if "INCREMENTAL_TEST_CACHE" not in os.environ:
    os.environ["INCREMENTAL_TEST_CACHE"] = tempfile.mkdtemp(prefix="incremental-tests-")
    atexit.register(shutil.rmtree, os.environ["INCREMENTAL_TEST_CACHE"], ignore_errors=True)
os.environ["INCREMENTAL_CACHE"] = os.environ["INCREMENTAL_TEST_CACHE"]

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests derive their configs from the real ones in configs/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


# The files that take longest (CPU seconds of the full suite measured on 2 cores, longest first).
# pytest-xdist's `--dist loadfile` hands whole files to the workers in collection order, so running
# these first leaves the short files to even out the two workers' ends instead of one long file
# running alone at the end.
LONGEST_FIRST = (
    "test_capacity_methods.py", "test_online.py", "test_reproduce.py", "test_resilience.py",
    "test_capacity.py", "test_pretrained_methods.py", "test_configs.py", "test_foster.py",
    "test_growth.py", "test_bic_wa.py", "test_learn.py", "test_scenarios.py", "test_run.py",
    "test_multihost.py", "test_models.py", "test_seeds.py", "test_surgery.py",
    "test_adapter_methods.py", "test_workdirs.py", "test_regularisers.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    del config
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept
