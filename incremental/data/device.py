"""Device-resident data: placement, batching by indices, normalisation and augmentation in JAX.

A phase's training arrays go to the device once, in their stored dtype (uint8 for images). Batches are
gathered inside the jitted step from index arrays, then normalised and augmented there, so the host never
touches a batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from incremental.data import autoaugment


class Normalizer(NamedTuple):
    """Per-channel (images) or per-feature (vectors) mean and standard deviation, in stored units.

    Both keep the rank of a batch (shape (1, 1, 1, C) or (1, D)), so they broadcast explicitly.
    """

    mean: np.ndarray
    std: np.ndarray


def fit_normalizer(x: np.ndarray, is_image: bool) -> Normalizer:
    """Statistics of the training inputs, over every axis but the channel / feature axis."""
    axes = tuple(range(x.ndim - 1)) if is_image else (0,)
    x = x.astype(np.float64)
    mean, std = x.mean(axis=axes, keepdims=True), x.std(axis=axes, keepdims=True)
    return Normalizer(mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32))


def normalize(x: jax.Array, norm: Normalizer, dtype=jnp.float32) -> jax.Array:
    return ((x.astype(jnp.float32) - norm.mean) / norm.std).astype(dtype)


def random_crop(rng: jax.Array, x_BHWC: jax.Array, padding: int) -> jax.Array:
    """Random crop of the original size from images zero-padded by `padding` (in stored units)."""
    b, h, w, c = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, x_BHWC: jax.Array) -> jax.Array:
    """Horizontal flip of each image with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (x_BHWC.shape[0], 1, 1, 1))
    return jnp.where(flip, x_BHWC[:, :, ::-1], x_BHWC)


def random_brightness(rng: jax.Array, x_BHWC: jax.Array, strength: float) -> jax.Array:
    """torchvision's ColorJitter(brightness=strength): each image times a factor drawn uniformly from
    [max(0, 1 - strength), 1 + strength], clipped to the stored range (0-255 for uint8 images, 0-1
    for float ones). Unlike PIL on uint8 images, the result is not rounded to integers."""
    low = max(0.0, 1.0 - strength)
    factor = jax.random.uniform(rng, (x_BHWC.shape[0], 1, 1, 1), jnp.float32, low, 1.0 + strength)
    top = 255.0 if x_BHWC.dtype == jnp.uint8 else 1.0
    return jnp.clip(x_BHWC.astype(jnp.float32) * factor, 0.0, top)


def random_cutout(rng: jax.Array, x_BHWC: jax.Array, length: int) -> jax.Array:
    """Cutout (DeVries and Taylor 2017) as the official FOSTER code applies it (G-U-N/ECCV22-FOSTER
    `utils/data.py` lines 8-33 at 555c7f0): per image one square of side `length` centred on a pixel
    drawn uniformly, clipped at the borders (rows [y - length // 2, y + length // 2), so an odd `length` loses a row and
    a column as there), set to 0."""
    b, h, w, _ = x_BHWC.shape
    y_rng, x_rng = jax.random.split(rng)
    y, x = jax.random.randint(y_rng, (b, 1), 0, h), jax.random.randint(x_rng, (b, 1), 0, w)
    half = length // 2
    rows = jnp.abs(jnp.arange(h)[None, :] - y + 0.5) <= half  # (B, H)
    cols = jnp.abs(jnp.arange(w)[None, :] - x + 0.5) <= half  # (B, W)
    hole = rows[:, :, None, None] & cols[:, None, :, None]
    return jnp.where(hole, jnp.zeros((), x_BHWC.dtype), x_BHWC)


class Augment(NamedTuple):
    """Training augmentation of raw images on the device, in PyCIL's order: crop, flip, brightness,
    then (the official FOSTER code's) AutoAugment and Cutout."""

    crop_padding: int = 0  # random crop of the original size after zero padding (0: off)
    flip: bool = False  # random horizontal flip
    brightness: float = 0.0  # ColorJitter's brightness strength (0: off); PyCIL CIFAR: 63 / 255
    cutout: int = 0  # side of Cutout's zeroed square, in pixels (0: off); official FOSTER: 16
    autoaugment: str = ""  # AutoAugment policy ('': off); official FOSTER CIFAR: 'cifar10'

    @classmethod
    def from_config(cls, augment, is_image: bool) -> Augment:
        """`config.augment` for images; nothing for feature vectors."""
        if not is_image:
            return cls()
        return cls(
            augment.crop_padding,
            augment.flip,
            augment.get("brightness", 0.0),
            augment.get("cutout", 0),
            augment.get("autoaugment", ""),
        )

    def __bool__(self) -> bool:
        return any(self)


def augment(rng: jax.Array, x: jax.Array, spec: Augment) -> jax.Array:
    """Training augmentation of raw images (before normalisation); a no-op when all is off."""
    crop_rng, flip_rng = jax.random.split(rng)
    if spec.crop_padding:
        x = random_crop(crop_rng, x, spec.crop_padding)
    if spec.flip:
        x = random_flip(flip_rng, x)
    if spec.brightness:
        x = random_brightness(jax.random.fold_in(rng, 2), x, spec.brightness)
    if spec.autoaugment:
        x = autoaugment.autoaugment(jax.random.fold_in(rng, 4), x, spec.autoaugment)
    if spec.cutout:
        x = random_cutout(jax.random.fold_in(rng, 3), x, spec.cutout)
    return x


NO_AUGMENT = Augment()

# `fold_in` tags of the two uses of a phase's training key.
ORDER, AUGMENT = 0, 1


def epoch_key(rng: jax.Array, epoch: int | jax.Array) -> jax.Array:
    """The key of epoch `epoch`'s order, from a phase's training key (`TrainState.rng`)."""
    return jax.random.fold_in(jax.random.fold_in(rng, ORDER), epoch)


def step_key(rng: jax.Array, step: int | jax.Array) -> jax.Array:
    """The key of step `step`'s augmentation, from a phase's training key."""
    return jax.random.fold_in(jax.random.fold_in(rng, AUGMENT), step)


def batch_indices(
    rng: jax.Array, num_examples: int | jax.Array, batch_size: int, slots: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """A shuffled epoch as fixed-shape batches of indices, and their weights.

    The permutation sorts one random 32-bit key per example (ties by position). The last short
    batch is padded to `batch_size` with the first indices of the permutation (cycled if the phase
    has fewer examples than a batch), whose weight is 0: every example is used once per epoch and
    every batch has the same shape, so the step compiles once. (Padded rows still enter BatchNorm's
    batch statistics; they are real examples.)

    `num_examples` may be traced when `slots` (static, at least `num_examples`) gives the
    permutation's length: the keys of positions from `num_examples` on sort last, and there are
    `ceil(slots / batch_size)` batches, of which the first `ceil(num_examples / batch_size)` are
    the epoch's. Random bits are drawn per position (threefry is partitionable by default), so
    the epoch is the one `slots=None` gives: a program compiled once for phases of any size
    (`head.capacity`) sees each phase's own batches.

    Returns:
      (idx, weight), both (num_batches, batch_size).
    """
    slots = num_examples if slots is None else slots
    num_batches = -(-slots // batch_size)
    positions = jnp.arange(slots)
    keys = jax.random.bits(rng, (slots,), jnp.uint32)
    keys = jnp.where(positions < num_examples, keys, jnp.uint32(np.iinfo(np.uint32).max))
    perm = jnp.argsort(keys, stable=True)
    total = jnp.arange(num_batches * batch_size)
    idx = perm[total % num_examples]
    weight = (total < num_examples).astype(jnp.float32)
    return idx.reshape(num_batches, batch_size), weight.reshape(num_batches, batch_size)


def padded_batches(x: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """Pads `x` along axis 0 to a multiple of `batch_size` (for evaluation); returns it and the count."""
    n = len(x)
    pad = -n % batch_size
    if pad:
        x = np.concatenate([x, np.repeat(x[:1], pad, axis=0)])
    return x.reshape(-1, batch_size, *x.shape[1:]), n
