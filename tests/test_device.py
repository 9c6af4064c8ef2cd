"""Tests for incremental/data/device.py's random resized crop (torchvision's RandomResizedCrop)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from incremental.data import device

_BOXES = jax.jit(device.resized_crop_boxes, static_argnums=(1, 2, 3, 4, 5))


def boxes(seed: int, num: int, height: int, width: int, **kwargs) -> np.ndarray:
    """(num, 4) boxes (top, left, height, width) drawn by `resized_crop_boxes`, in one program."""
    scale, ratio = kwargs.get("scale", (0.08, 1.0)), kwargs.get("ratio", (3 / 4, 4 / 3))
    drawn = _BOXES(jax.random.key(seed, impl="rbg"), num, height, width, scale, ratio)
    return np.stack([np.asarray(a) for a in drawn], axis=1)


def torchvision_areas(rng: np.random.Generator, num: int, height: int, width: int) -> np.ndarray:
    """Area fractions of `num` boxes drawn as torchvision's `RandomResizedCrop.get_params` draws
    them (scale (0.08, 1), ratio (3/4, 4/3)): up to 10 tries, the first that fits, else central."""
    areas = []
    for _ in range(num):
        for _ in range(10):
            area = height * width * rng.uniform(0.08, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                areas.append(h * w / (height * width))
                break
        else:
            areas.append(1.0)  # the whole image, whose ratio (3/4 here) is in range
    return np.asarray(areas)


def test_boxes_lie_inside_the_image_with_torchvisions_area_and_ratio():
    top, left, h, w = boxes(0, 4000, 48, 36).T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= 48).all() and (left + w <= 36).all()
    area, ratio = h * w / (48 * 36), w / h
    # Sides are rounded to pixels: the ranges hold to within a pixel's share.
    assert area.min() >= 0.08 - 0.03 and area.max() <= 1.0
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1
    # Large boxes that do not fit a portrait image are drawn again: the areas' distribution is
    # torchvision's, not uniform.
    reference = torchvision_areas(np.random.default_rng(0), 4000, 48, 36)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(reference, q)) < 0.03, q


def test_box_statistics_follow_the_requested_distributions():
    # Every box fits at this scale, so the area fraction is uniform and the ratio log-uniform.
    top, left, h, w = boxes(1, 4000, 1000, 1000, scale=(0.2, 0.4), ratio=(0.5, 2.0)).T
    area, log_ratio = h * w / 1e6, np.log(w / h)
    assert abs(area.mean() - 0.3) < 0.005 and abs(area.std() - 0.2 / math.sqrt(12)) < 0.005
    assert abs(log_ratio.mean()) < 0.03
    assert abs(log_ratio.std() - 2 * math.log(2) / math.sqrt(12)) < 0.02
    # Offsets are uniform over the positions that keep the box inside.
    assert (
        abs((top / (1000 - h)).mean() - 0.5) < 0.02 and abs((left / (1000 - w)).mean() - 0.5) < 0.02
    )


def test_no_box_fits_falls_back_to_the_central_crop_clamped_to_the_ratio():
    # Boxes of the whole area with width / height in [2, 3] never fit a square image.
    got = boxes(2, 16, 40, 40, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    np.testing.assert_array_equal(got, np.tile([[10, 0, 20, 40]], (16, 1)))


def test_a_crop_of_a_gradient_image_takes_its_values_from_its_box():
    # Pixel (r, c) holds c in channel 0 and r in channel 1: every output value is a convex
    # combination of its box's pixels, so it lies within the box's columns and rows.
    rows, cols = np.meshgrid(np.arange(48.0), np.arange(40.0), indexing="ij")
    x = jnp.asarray(np.tile(np.stack([cols, rows], -1)[None], (64, 1, 1, 1)), jnp.float32)
    drawn = _BOXES(jax.random.key(3, impl="rbg"), 64, 48, 40, (0.05, 1.0), (3 / 4, 4 / 3))
    out = np.asarray(jax.jit(device.resized_crop, static_argnums=2)(x, drawn, 24))
    top, left, h, w = (np.asarray(a)[:, None, None] for a in drawn)
    assert out.shape == (64, 24, 24, 2)
    assert (out[..., 0] >= left - 1e-4).all() and (out[..., 0] <= left + w - 1 + 1e-4).all()
    assert (out[..., 1] >= top - 1e-4).all() and (out[..., 1] <= top + h - 1 + 1e-4).all()
    # The box of a whole square image, at its own size, is the image itself.
    whole = tuple(jnp.asarray([v]) for v in (0, 0, 40, 40))
    square = x[:1, :40]
    np.testing.assert_allclose(device.resized_crop(square, whole, 40), square, atol=1e-4)


def test_augment_crops_first_from_the_config_deterministically_and_keeps_uint8():
    from incremental.config import base_config

    augment = base_config().augment
    assert not device.Augment.from_config(augment, True)  # ranges alone switch nothing on
    augment.resized_crop, augment.flip, augment.resized_crop_scale = 16, True, [0.05, 1.0]
    spec = device.Augment.from_config(augment, True)
    assert spec and spec.resized_crop_scale == (0.05, 1.0) and hash(spec)
    assert not device.Augment.from_config(augment, False)  # feature vectors: nothing
    x = jnp.asarray(np.random.default_rng(1).integers(0, 17, (4, 8, 8, 1)), jnp.uint8)
    run = jax.jit(device.augment, static_argnums=2)
    out = run(jax.random.key(6, impl="rbg"), x, spec)
    assert out.shape == (4, 16, 16, 1) and out.dtype == jnp.uint8 and int(out.max()) <= 16
    np.testing.assert_array_equal(out, run(jax.random.key(6, impl="rbg"), x, spec))
    assert not np.array_equal(out, run(jax.random.key(7, impl="rbg"), x, spec))


def test_a_vit_must_evaluate_images_of_the_crops_side():
    from types import SimpleNamespace

    from configs import vit_cifar100
    from incremental.phase import load

    config = vit_cifar100.get_config()
    data = SimpleNamespace(is_image=True, x_train=np.zeros((2, 32, 32, 3), np.uint8))
    load.check_resized_crop(config, data)  # crops of 224, the model resizes to 224
    config.model.kwargs.resize = 0
    with pytest.raises(ValueError, match="evaluates \\(32, 32\\); set model.kwargs.resize=224"):
        load.check_resized_crop(config, data)
    stored_at_224 = SimpleNamespace(is_image=True, x_train=np.zeros((2, 224, 224, 3), np.uint8))
    load.check_resized_crop(config, stored_at_224)  # no resize needed
