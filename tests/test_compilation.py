"""The persistent compilation cache: a second run reads its programs instead of compiling them."""

import os
import time

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

from configs import digits
from incremental import compilation
from incremental import run as run_lib


def test_second_run_reads_compiled_programs_from_the_cache(tmp_path):
    config = digits.get_config("method=replay")
    config.train.epochs = config.train_first.epochs = 2
    config.log.progress = config.log.plot = False
    config.compile_cache = str(tmp_path / "cache")
    previous = jax.config.jax_compilation_cache_dir
    try:
        first = run_lib.run(config, str(tmp_path / "first"))
        second = run_lib.run(config, str(tmp_path / "second"))
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        compilation_cache.reset_cache()
    assert any((tmp_path / "cache").iterdir())
    hits = [[p["compile_cache_hits"] for p in r["phases"]] for r in (first, second)]
    # The first run finds only what it wrote itself (a compile-once run: its later phases reuse
    # phase 0's programs); the second finds phase 0's too.
    assert hits[1][0] > hits[0][0] and sum(hits[1]) > sum(hits[0]), hits
    # Phase 0 traces its programs; a later one may find every function it needs already built
    # in the process (the evaluation's, the model's init), and compile nothing.
    assert first["phases"][0]["compile_seconds"] > 0
    assert second["accuracy_matrix"] == first["accuracy_matrix"]


def test_the_cache_can_be_turned_off():
    assert compilation.use_cache("") is None


def test_the_suites_kept_compile_cache_keeps_the_newest_files_within_its_limit(tmp_path):
    import conftest  # the suite's own module: its cache of compiled programs outlives the session

    for age, name in enumerate(["old", "middle", "new"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 10)
        os.utime(path, (1000 + age, 1000 + age))
    conftest.keep_newest(str(tmp_path), 25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle", "new"]
    conftest.keep_newest(str(tmp_path), 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle", "new"]


def test_the_suite_compiles_into_its_kept_cache():
    kept = os.environ.get("INCREMENTAL_COMPILE_CACHE")
    if not kept:  # -p no:cacheprovider or a given INCREMENTAL_TEST_CACHE: the session's own cache
        temporary = os.path.join(os.environ["INCREMENTAL_CACHE"], "jax")
        assert compilation.use_cache("auto") == temporary
        return
    assert kept.endswith(os.path.join(".pytest_cache", "d", "incremental-jax"))
    assert compilation.use_cache("auto") == kept
    before = set(os.listdir(kept))
    new = float(time.time_ns() % 1_000_003)  # a constant no earlier session compiled
    jax.jit(lambda x: x * 3.0 + new)(jax.numpy.arange(7.0)).block_until_ready()
    assert set(os.listdir(kept)) - before


def test_inits_hash_without_loops_and_draw_the_same_bits():
    def draws():
        def draw(key):
            keys = jax.random.split(jax.random.fold_in(key, 3), 3)
            return jax.random.normal(keys[0], (5, 7)), jax.random.bits(keys[2], (11,))

        lowered = jax.jit(draw).lower(jax.random.PRNGKey(0))
        loops = lowered.as_text().count("stablehlo.while")
        return loops, jax.device_get(lowered.compile()(jax.random.PRNGKey(0)))

    with compilation.unrolled_threefry():
        with compilation.unrolled_threefry():
            pass  # an inner block's end leaves the outer one unrolled
        unrolled_loops, unrolled = draws()
    loops, rolled = draws()  # after the block, JAX's own lowering again
    assert unrolled_loops == 0 and loops > 0, (unrolled_loops, loops)
    jax.tree.map(np.testing.assert_array_equal, unrolled, rolled)
