"""Device-resident data: placement, batching by indices, normalisation and augmentation in JAX.

A phase's training arrays go to the device once, in their stored dtype (uint8 for images). Batches are
gathered inside the jitted step from index arrays, then normalised and augmented there, so the host never
touches a batch.
"""

from __future__ import annotations

import math
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


def resized_crop_boxes(
    rng: jax.Array,
    num: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    tries: int = 10,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """torchvision's `RandomResizedCrop.get_params` for `num` images of height x width at once.

    Each image draws `tries` boxes of area `scale` times the image's (uniform) and aspect ratio
    width / height log-uniform in `ratio`, sides rounded, and keeps the first that fits; where none
    fits, the central crop of the whole image with its ratio clamped to `ratio`. The offset is
    uniform over the positions that keep the box inside the image.

    Returns:
      (top, left, crop_height, crop_width), each (num,) int32.
    """
    area_rng, ratio_rng, top_rng, left_rng = jax.random.split(rng, 4)
    areas = (
        height
        * width
        * jax.random.uniform(area_rng, (num, tries), minval=scale[0], maxval=scale[1])
    )
    log_ratio = jax.random.uniform(
        ratio_rng, (num, tries), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    w = jnp.round(jnp.sqrt(areas * jnp.exp(log_ratio)))
    h = jnp.round(jnp.sqrt(areas / jnp.exp(log_ratio)))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    found = fits.any(axis=1)
    fallback_h, fallback_w = _central_box(height, width, ratio)
    h = jnp.where(found, jnp.take_along_axis(h, first, axis=1)[:, 0], fallback_h).astype(jnp.int32)
    w = jnp.where(found, jnp.take_along_axis(w, first, axis=1)[:, 0], fallback_w).astype(jnp.int32)

    def offset(key, room):  # uniform in [0, room], as randint(0, room + 1); central when not found
        drawn = jnp.floor(jax.random.uniform(key, (num,)) * (room + 1)).astype(jnp.int32)
        return jnp.where(found, jnp.minimum(drawn, room), room // 2)

    return offset(top_rng, height - h), offset(left_rng, width - w), h, w


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop (height, width): the whole image, its ratio clamped to `ratio`."""
    if width / height < min(ratio):
        return round(width / min(ratio)), width
    if width / height > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def _resize_weights(start: jax.Array, length: jax.Array, in_size: int, out_size: int) -> jax.Array:
    """(B, out_size, in_size) bilinear weights resizing each row's [start, start + length) to
    out_size pixels, as PIL resizes a crop: triangle kernel widened by the factor when it shrinks
    (antialiased), pixel centres aligned, weights renormalised over the crop's pixels only."""
    factor = (length / out_size).astype(jnp.float32)[:, None, None]
    first = start.astype(jnp.float32)[:, None, None]
    centres = first + (jnp.arange(out_size, dtype=jnp.float32)[None, :, None] + 0.5) * factor
    pixels = jnp.arange(in_size, dtype=jnp.float32)[None, None, :] + 0.5
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels - centres) / jnp.maximum(factor, 1.0))
    inside = (pixels > first) & (pixels < first + length.astype(jnp.float32)[:, None, None])
    weights = jnp.where(inside, weights, 0.0)
    return weights / weights.sum(axis=-1, keepdims=True)


def resized_crop(x_BHWC: jax.Array, boxes: tuple[jax.Array, ...], size: int) -> jax.Array:
    """Each image's box (top, left, height, width) resized to size x size, bilinearly (PIL's
    antialiased bilinear). Every output pixel is a convex combination of its box's pixels; integer
    images are rounded back to their dtype (as PIL's uint8 images are), float ones stay float32."""
    top, left, height, width = boxes
    rows = _resize_weights(top, height, x_BHWC.shape[1], size)  # (B, size, H)
    cols = _resize_weights(left, width, x_BHWC.shape[2], size)  # (B, size, W)
    out = jnp.einsum("bsh,bhwc,btw->bstc", rows, x_BHWC.astype(jnp.float32), cols)
    if jnp.issubdtype(x_BHWC.dtype, jnp.integer):
        info = jnp.iinfo(x_BHWC.dtype)
        return jnp.clip(jnp.round(out), info.min, info.max).astype(x_BHWC.dtype)
    return out


def random_resized_crop(
    rng: jax.Array,
    x_BHWC: jax.Array,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """torchvision's `RandomResizedCrop(size, scale, ratio)` (bilinear) of every image of a batch:
    a box per image (`resized_crop_boxes`), resized to size x size (`resized_crop`)."""
    b, h, w, _ = x_BHWC.shape
    return resized_crop(x_BHWC, resized_crop_boxes(rng, b, h, w, scale, ratio), size)


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
    then (the official FOSTER code's) AutoAugment and Cutout. A random resized crop (the
    pre-trained-model methods' ImageNet-style crop) comes first, before the padded crop."""

    crop_padding: int = 0  # random crop of the original size after zero padding (0: off)
    flip: bool = False  # random horizontal flip
    brightness: float = 0.0  # ColorJitter's brightness strength (0: off); PyCIL CIFAR: 63 / 255
    cutout: int = 0  # side of Cutout's zeroed square, in pixels (0: off); official FOSTER: 16
    autoaugment: str = ""  # AutoAugment policy ('': off); official FOSTER CIFAR: 'cifar10'
    resized_crop: int = 0  # RandomResizedCrop's output side (0: off); PILOT's ViT CIFAR: 224
    resized_crop_scale: tuple[float, float] = (0.08, 1.0)  # its range of the area's fraction
    resized_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its range of width / height

    @classmethod
    def from_config(cls, augment, is_image: bool) -> Augment:
        """`config.augment` for images; nothing for feature vectors."""
        if not is_image:
            return cls()
        defaults = cls._field_defaults
        return cls(
            augment.crop_padding,
            augment.flip,
            augment.get("brightness", 0.0),
            augment.get("cutout", 0),
            augment.get("autoaugment", ""),
            augment.get("resized_crop", 0),
            _pair(augment.get("resized_crop_scale", defaults["resized_crop_scale"])),
            _pair(augment.get("resized_crop_ratio", defaults["resized_crop_ratio"])),
        )

    def __bool__(self) -> bool:
        # The resized crop's ranges are its parameters, not switches.
        return any(self[:6])


def _pair(values) -> tuple[float, float]:
    """A (low, high) range from the config, as the hashable floats a static argument needs."""
    low, high = (float(v) for v in values)
    return low, high


def augment(rng: jax.Array, x: jax.Array, spec: Augment) -> jax.Array:
    """Training augmentation of raw images (before normalisation); a no-op when all is off."""
    crop_rng, flip_rng = jax.random.split(rng)
    if spec.resized_crop:
        x = random_resized_crop(
            jax.random.fold_in(rng, 5), x, spec.resized_crop, spec.resized_crop_scale,
            spec.resized_crop_ratio,
        )  # fmt: skip
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
