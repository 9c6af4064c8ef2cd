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
