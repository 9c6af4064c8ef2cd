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
# a program compiled by one test is read from the persistent cache by the next.
_cache = tempfile.mkdtemp(prefix="incremental-tests-")
os.environ["INCREMENTAL_CACHE"] = _cache
atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests derive their configs from the real ones in configs/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
