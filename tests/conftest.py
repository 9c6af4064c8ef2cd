"""Strict JAX for every test, and small shared fixtures."""

import os
import sys

import jax
import pytest

# Tests derive their configs from the real ones in configs/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)
