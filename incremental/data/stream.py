"""Streaming input: a phase's training batches read on the host and sent to the device ahead of use.

For datasets too large to keep on the device (ImageNet-100 and larger), a phase's examples stay in
a random-access source on the host: numpy arrays, or a `tfds.data_source` split, whose records
are decoded by TFDS as they are read. The entry point is `StreamingBatches`:

    records = open_tfds_split("imagenet2012_subset", "train", data_dir=...)
    stream = StreamingBatches(records, phase_indices, batch_size, remap=class_position)
    for x_BHWC, y_B, weight_B in stream.batches(state.rng, state.step):
        ...  # uint8 images, int32 labels, float32 weights, already on the device

The batches are the in-memory path's (`train.make_train_epoch`), in content and in order: epoch
`e`'s order is `device.batch_indices(device.epoch_key(state.rng, e), n, batch_size)`,
computed once per epoch on the host, so batch `b` holds the phase's examples `idx[b]` with weights
`weight[b]` (0 for the padding of the last batch). `batches(rng, step)` starts at `step`'s
position in its epoch, so a resumed run continues on the same batches. Augmentation and
normalisation stay on the device, as in the in-memory path (`device.augment`, `device.normalize`).

Reading runs in grain: one element per batch, read by a pool of threads (`num_threads`) a few
batches ahead (`host_prefetch`); each batch is then put on the device `device_prefetch` batches
ahead of the consumer, with an optional sharding.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np

from incremental.data import device, sources

# A lookup array (dataset label -> class position) or a function applying one to an array.
Remap = np.ndarray | Callable[[np.ndarray], np.ndarray]


class StreamBatch(NamedTuple):
    """One training batch: raw inputs (uint8 images), class positions and example weights."""

    x: Any  # (B, ...) in stored dtype
    y: Any  # (B,) int32
    weight: Any  # (B,) float32, 0 for padding


def epoch_order(
    key: jax.Array, num_examples: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`device.batch_indices` for one epoch, read back to the host.

    Returns:
      (idx, weight), numpy (num_batches, batch_size): positions in the phase's examples and weights.
    """
    idx, weight = device.batch_indices(key, num_examples, batch_size)
    idx, weight = jax.device_get((idx, weight))
    return np.asarray(idx, np.int64), np.asarray(weight, np.float32)


def open_tfds_split(name: str, split: str = "train", *, data_dir: str | None = None) -> Any:
    """A `tfds.data_source` split for streaming; never downloads, fails fast if not prepared."""
    return sources.tfds_data_source(name, split=split, data_dir=data_dir)


class PhaseRecords:
    """Random access to a phase's training examples: a subset of a split, with remapped labels.

    Args:
      records: `(x, y)` numpy arrays, or a random-access source of dict records such as a
        `tfds.data_source` split (anything with `__len__` and `__getitem__`).
      indices: (n,) the phase's examples, as indices into `records`.
      remap: dataset label -> class position, as a lookup array (negative entries mark labels
        that must not occur) or a function on an int array; None keeps the labels.
      image_key, label_key: the record keys of dict records (TFDS names, as `sources` reads them).
      transform: applied to each image on the host before batching (e.g. a resize to a fixed
        shape for datasets whose images differ in size); must return arrays of one shape.
    """

    def __init__(
        self,
        records: tuple[np.ndarray, np.ndarray] | Any,
        indices: np.ndarray | Sequence[int],
        *,
        remap: Remap | None = None,
        image_key: str = "image",
        label_key: str = "label",
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self._arrays = _check_arrays(records) if isinstance(records, tuple) else None
        if self._arrays is None and not (
            hasattr(records, "__len__") and hasattr(records, "__getitem__")
        ):
            raise TypeError(
                f"records must be (x, y) numpy arrays or a random-access source such as "
                f"tfds.data_source(...); got {type(records).__name__}."
            )
        self._records = records
        self.indices = _check_indices(
            indices, len(self._arrays[0]) if self._arrays else len(records)
        )
        if remap is not None and not (callable(remap) or isinstance(remap, np.ndarray)):
            raise TypeError(f"remap must be a numpy lookup array or a callable; got {type(remap)}.")
        self._remap = remap
        self._image_key, self._label_key = image_key, label_key
        self._transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inputs and class positions of the phase's examples at `positions` (in that order)."""
        keys = self.indices[positions]
        if self._arrays is not None:
            x, labels = self._arrays[0][keys], self._arrays[1][keys]
        else:
            x, labels = self._read_records(keys)
        if self._transform is not None:
            x = _stack([self._transform(image) for image in x])
        return x, self._labels(labels)

    def _read_records(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        records = sources._read_records(self._records, [int(k) for k in keys])
        try:
            images = [np.asarray(r[self._image_key]) for r in records]
            labels = np.asarray([r[self._label_key] for r in records])
        except KeyError as e:
            raise ValueError(
                f"Records have keys {sorted(records[0])}; expected image_key={self._image_key!r} "
                f"and label_key={self._label_key!r}."
            ) from e
        return (images if self._transform is not None else _stack(images)), labels

    def _labels(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, np.int64)
        if self._remap is None:
            mapped = labels
        elif callable(self._remap):
            mapped = np.asarray(self._remap(labels))
        else:
            if labels.min() < 0 or labels.max() >= len(self._remap):
                raise ValueError(
                    f"Labels {labels.min()}..{labels.max()} fall outside the remap lookup of "
                    f"length {len(self._remap)}."
                )
            mapped = self._remap[labels]
        if mapped.shape != labels.shape:
            raise ValueError(f"remap gave shape {mapped.shape} for labels of shape {labels.shape}.")
        if len(mapped) and mapped.min() < 0:
            bad = sorted(set(labels[mapped < 0].tolist()))
            raise ValueError(
                f"remap has no class position for labels {bad}; the phase's indices must select "
                f"only examples of classes the remap knows."
            )
        return mapped.astype(np.int32)


class StreamingBatches:
    """A phase's training batches, streamed from the host in the in-memory path's order.

    Args:
      records, indices, remap, image_key, label_key, transform: see `PhaseRecords`.
      batch_size: examples per batch; the last batch of an epoch is padded with weight 0.
      num_threads: host threads reading and decoding batches (0 reads in the consumer's thread,
        with no host prefetch).
      host_prefetch: batches read ahead on the host (at least `num_threads` are).
      device_prefetch: batches put on the device ahead of the consumer.
      sharding: passed to `jax.device_put` (a `Sharding` or device); None is the default device.
    """

    def __init__(
        self,
        records: tuple[np.ndarray, np.ndarray] | Any,
        indices: np.ndarray | Sequence[int],
        batch_size: int,
        *,
        remap: Remap | None = None,
        image_key: str = "image",
        label_key: str = "label",
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        num_threads: int | None = None,
        host_prefetch: int = 4,
        device_prefetch: int = 2,
        sharding: Any = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}.")
        if num_threads is None:
            num_threads = min(16, os.cpu_count() or 1)
        if num_threads < 0 or host_prefetch < 0 or device_prefetch < 0:
            raise ValueError(
                f"num_threads={num_threads}, host_prefetch={host_prefetch} and "
                f"device_prefetch={device_prefetch} must be non-negative."
            )
        self.source = PhaseRecords(
            records,
            indices,
            remap=remap,
            image_key=image_key,
            label_key=label_key,
            transform=transform,
        )
        self.batch_size = batch_size
        # No threads means no host prefetch: grain (0.2.12) refuses a buffer without threads.
        buffer = max(host_prefetch, num_threads) if num_threads else 0
        self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer)
        self._device_prefetch = device_prefetch
        self._sharding = sharding

    @property
    def num_examples(self) -> int:
        return len(self.source)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_examples // self.batch_size)

    def epoch(self, state_rng: jax.Array, epoch: int, start: int = 0) -> Iterator[StreamBatch]:
        """Batches `start`, `start + 1`, ... of epoch `epoch` of a train state with key `state_rng`."""
        return self.epoch_from_key(device.epoch_key(state_rng, epoch), start)

    def batches(self, state_rng: jax.Array, step: int | jax.Array) -> Iterator[StreamBatch]:
        """The rest of the epoch that train step `step` is in, from that step's batch on."""
        epoch, start = divmod(int(jax.device_get(step)), self.steps_per_epoch)
        return self.epoch(state_rng, epoch, start)

    def epoch_from_key(self, order_key: jax.Array, start: int = 0) -> Iterator[StreamBatch]:
        """Batches from `start` on of the epoch whose order `device.batch_indices` draws from a key."""
        if not 0 <= start < self.steps_per_epoch:
            raise ValueError(
                f"start={start} is outside the epoch's {self.steps_per_epoch} batches."
            )
        idx, weight = epoch_order(order_key, self.num_examples, self.batch_size)
        read = lambda b: self._read_batch(idx[b], weight[b])
        dataset = grain.MapDataset.range(start, len(idx)).map(read)
        return prefetch_to_device(
            dataset.to_iter_dataset(self._read_options), self._device_prefetch, self._sharding
        )

    def _read_batch(self, idx_b: np.ndarray, weight_b: np.ndarray) -> StreamBatch:
        x, y = self.source.read(idx_b)
        return StreamBatch(x, y, weight_b)


def prefetch_to_device(
    batches: Iterator[Any] | Any, size: int, sharding: Any = None
) -> Iterator[Any]:
    """Yields `batches` put on the device, `size` batches ahead of the consumer.

    `jax.device_put` returns before the copy ends, so the copies of the next batches overlap the
    work on the current one. A grain iterator is closed (its threads stopped) when this generator
    is exhausted or closed.
    """
    iterator = iter(batches)
    queue = collections.deque()
    try:
        for batch in iterator:
            queue.append(jax.device_put(batch, sharding))
            if len(queue) > size:
                yield queue.popleft()
        while queue:
            yield queue.popleft()
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _check_arrays(records: tuple) -> tuple[np.ndarray, np.ndarray]:
    if len(records) != 2:
        raise TypeError(f"records as a tuple must be (x, y); got {len(records)} items.")
    x, y = np.asarray(records[0]), np.asarray(records[1])
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"records (x, y) have shapes {x.shape} and {y.shape}; expected (N, ...), (N,)."
        )
    return x, y


def _check_indices(indices: np.ndarray | Sequence[int], size: int) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim != 1 or not len(indices):
        raise ValueError(f"indices must be a non-empty 1-D array; got shape {indices.shape}.")
    if not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must be integers; got dtype {indices.dtype}.")
    if indices.min() < 0 or indices.max() >= size:
        raise ValueError(
            f"indices span {indices.min()}..{indices.max()}; the source has {size} examples."
        )
    return indices.astype(np.int64)


def _stack(images: Sequence[np.ndarray]) -> np.ndarray:
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(
            f"A batch has images of shapes {sorted(shapes)}; pass `transform` to bring them to "
            f"one shape (e.g. a resize) before batching."
        )
    return np.stack(images)
