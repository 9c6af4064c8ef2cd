"""Tests for incremental/data/stream.py: streamed batches are the in-memory path's batches."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from incremental import train
from incremental.data import device, sources, stream

BATCH = 8


def in_memory_batches(x_all, y_all, rng, epoch, batch_size=BATCH):
    """Epoch `epoch`'s batches as the jitted train step gathers them from device arrays."""

    @jax.jit
    def gather(rng, x_all, y_all):
        order_rng = jax.random.fold_in(jax.random.fold_in(rng, train.ORDER), epoch)
        idx, weight = device.batch_indices(order_rng, x_all.shape[0], batch_size)
        return x_all[idx], y_all[idx], weight

    return jax.device_get(gather(rng, jnp.asarray(x_all), jnp.asarray(y_all)))


def assert_same_batches(streamed, expected, start=0):
    x, y, weight = expected
    streamed = list(streamed)
    assert len(streamed) == len(x) - start
    for b, batch in enumerate(streamed, start):
        assert isinstance(batch.x, jax.Array) and batch.x.dtype == x.dtype
        assert batch.y.dtype == jnp.int32 and batch.weight.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(batch.x), x[b])
        np.testing.assert_array_equal(np.asarray(batch.y), y[b])
        np.testing.assert_array_equal(np.asarray(batch.weight), weight[b])


@pytest.fixture
def phase():
    """A split of 60 images in 6 classes; the phase trains on classes 4, 1 and 2 (positions 0..2)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 5, 5, 3), dtype=np.uint8)
    y = np.arange(60) % 6
    remap = np.full(6, -1, np.int32)
    remap[[4, 1, 2]] = [0, 1, 2]
    indices = np.flatnonzero(remap[y] >= 0)[::-1].copy()  # any order, 30 examples
    return x, y, remap, indices


def test_epoch_order_is_batch_indices(key):
    idx, weight = stream.epoch_order(key, 13, 4)
    expected_idx, expected_weight = device.batch_indices(key, 13, 4)
    assert isinstance(idx, np.ndarray) and idx.shape == (4, 4)
    np.testing.assert_array_equal(idx, expected_idx)
    np.testing.assert_array_equal(weight, expected_weight)
    assert weight.sum() == 13 and sorted(idx.ravel()[:13]) == list(range(13))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_arrays_stream_the_in_memory_batches(key, phase, num_threads):
    x, y, remap, indices = phase
    x_all, y_all = x[indices], remap[y[indices]]
    batches = stream.StreamingBatches(
        (x, y), indices, BATCH, remap=remap, num_threads=num_threads, device_prefetch=2
    )
    assert batches.steps_per_epoch == 4  # 30 examples: the last batch has 2 padded rows
    for epoch in (0, 1):
        assert_same_batches(batches.epoch(key, epoch), in_memory_batches(x_all, y_all, key, epoch))
    # Epochs differ, so the comparison above would notice a wrong epoch.
    assert not np.array_equal(
        in_memory_batches(x_all, y_all, key, 0)[1], in_memory_batches(x_all, y_all, key, 1)[1]
    )


def test_resumed_step_continues_mid_epoch(key, phase):
    x, y, remap, indices = phase
    x_all, y_all = x[indices], remap[y[indices]]
    batches = stream.StreamingBatches((x, y), indices, BATCH, remap=remap, num_threads=2)
    step = jnp.asarray(4 + 3)  # epoch 1, its last (padded) batch
    assert_same_batches(batches.batches(key, step), in_memory_batches(x_all, y_all, key, 1), 3)
    assert_same_batches(batches.epoch(key, 0, start=2), in_memory_batches(x_all, y_all, key, 0), 2)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_mock_data_streams_the_in_memory_batches(key, name):
    start = time.perf_counter()
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        records = stream.open_tfds_split(name, "train")
        src = sources.load_source(f"tfds:{name}")  # the in-memory path reads the same records
    remap = (np.arange(10) + 3) % 10  # a class order
    indices = np.arange(3, 40, 2)  # 19 examples, a partial last batch
    x_all, y_all = src.x_train[indices], remap[src.y_train[indices]]
    batches = stream.StreamingBatches(records, indices, BATCH, remap=remap, num_threads=2)
    for epoch in (0, 1):
        assert_same_batches(batches.epoch(key, epoch), in_memory_batches(x_all, y_all, key, epoch))
    assert_same_batches(batches.batches(key, 4), in_memory_batches(x_all, y_all, key, 1), 1)
    assert time.perf_counter() - start < 30


def test_remap_callable_transform_and_sharding(key, phase):
    x, y, remap, indices = phase
    flip = lambda image: image[:, ::-1]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    batches = stream.StreamingBatches(
        (x, y),
        indices,
        BATCH,
        remap=lambda labels: remap[labels],
        transform=flip,
        sharding=sharding,
    )
    x_all, y_all = x[indices][:, :, ::-1], remap[y[indices]]
    streamed = list(batches.epoch(key, 0))
    assert streamed[0].x.sharding == sharding
    assert_same_batches(streamed, in_memory_batches(x_all, y_all, key, 0))


def test_closing_early_stops_reading(key, phase):
    x, y, remap, indices = phase
    batches = stream.StreamingBatches((x, y), indices, 2, remap=remap, num_threads=2)
    iterator = batches.epoch(key, 0)
    first = next(iterator)
    iterator.close()
    assert first.x.shape == (2, 5, 5, 3)


def test_bad_inputs_raise_clear_errors(key, phase, tmp_path):
    x, y, remap, indices = phase
    with pytest.raises(ValueError, match="indices span"):
        stream.StreamingBatches((x, y), [0, 60], BATCH)
    with pytest.raises(TypeError, match="indices must be integers"):
        stream.StreamingBatches((x, y), [0.5], BATCH)
    with pytest.raises(TypeError, match="random-access source"):
        stream.StreamingBatches(object(), indices, BATCH)
    with pytest.raises(ValueError, match="outside the epoch"):
        stream.StreamingBatches((x, y), indices, BATCH).epoch(key, 0, start=4)
    unknown = stream.StreamingBatches((x, y), np.arange(60), BATCH, remap=remap, num_threads=0)
    with pytest.raises(ValueError, match="no class position for labels"):
        list(unknown.epoch(key, 0))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"scripts/prepare_tfds.py mnist --data_dir"):
        stream.open_tfds_split("mnist", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5


def test_a_streamed_run_trains_on_the_same_batches(tmp_path):
    """dataset.stream=True: the run's batches come from the host, with the device path's numbers."""
    from configs import digits
    from incremental import run as run_lib

    results = {}
    for streamed in (False, True):
        config = digits.get_config("method=replay")
        config.train.epochs = config.train_first.epochs = 2
        config.log.progress = config.log.plot = False
        config.train.loop = "steps"  # the device path's Python loop: the same program per step
        config.dataset.stream = streamed
        results[streamed] = run_lib.run(config, str(tmp_path / str(streamed)))
    losses = {k: [p["final_loss"] for p in r["phases"]] for k, r in results.items()}
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert results[True]["accuracy_matrix"] == results[False]["accuracy_matrix"]
