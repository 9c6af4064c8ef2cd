"""AutoAugment's CIFAR-10 policy on the device against PIL, operation by operation, as the official
FOSTER code (G-U-N/ECCV22-FOSTER 555c7f0, utils/ops.py) calls PIL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from incremental.data import autoaugment as aa
from incremental.data import device

FILL = (128, 128, 128)


def pil_op(name, image, magnitude, sign):
    """utils/ops.py's operation `name` with the sign drawn as `sign`."""
    m = magnitude * sign
    w, h = image.size
    if name == "shearY":
        return image.transform(
            image.size, Image.AFFINE, (1, 0, 0, m, 1, 0), Image.BICUBIC, fillcolor=FILL
        )
    if name == "translateX":
        return image.transform(image.size, Image.AFFINE, (1, 0, m * w, 0, 1, 0), fillcolor=FILL)
    if name == "translateY":
        return image.transform(image.size, Image.AFFINE, (1, 0, 0, 0, 1, m * h), fillcolor=FILL)
    if name == "rotate":
        rot = image.convert("RGBA").rotate(m)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB")
    enhancers = {
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "sharpness": ImageEnhance.Sharpness,
        "brightness": ImageEnhance.Brightness,
    }
    if name in enhancers:
        return enhancers[name](image).enhance(1 + m)
    if name == "posterize":
        return ImageOps.posterize(image, int(magnitude))
    if name == "solarize":
        return ImageOps.solarize(image, magnitude)
    return {
        "autocontrast": ImageOps.autocontrast,
        "equalize": ImageOps.equalize,
        "invert": ImageOps.invert,
    }[name](image)


def images():
    """A noisy image and a smooth one (a gradient with a bright square), 32 x 32 RGB."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(30, 220, size=(32, 32, 3)).astype(np.uint8)
    y, x = np.mgrid[:32, :32]
    smooth = np.stack([x * 6 + 20, y * 5 + 30, (x + y) * 3 + 10], -1).astype(np.float64)
    smooth[8:20, 10:24] += 40
    return {"noisy": noisy, "smooth": np.clip(smooth, 0, 255).astype(np.uint8)}


# (operation, magnitude index, largest |difference| allowed, fraction of pixels allowed to differ).
# PIL computes autocontrast's and contrast's tables in double precision and the grey mean from its
# integer luma; float32 here lands one below or above on a few pixels (measured: <= 1.5 % and 2.6 %).
CASES = [
    ("invert", 0, 0, 0.0),
    ("posterize", 7, 0, 0.0),
    ("solarize", 2, 0, 0.0),
    ("equalize", 0, 0, 0.0),
    ("autocontrast", 0, 1, 0.03),
    ("brightness", 7, 1, 0.01),
    ("color", 3, 1, 0.02),
    ("contrast", 7, 1, 0.04),
    ("sharpness", 5, 1, 0.02),
    ("translateX", 9, 0, 0.0),
    ("translateY", 3, 0, 0.0),
    ("rotate", 2, 255, 0.03),  # nearest neighbour: a few pixels on the edges of rounding
    ("shearY", 8, 255, 1.0),  # bilinear where PIL is bicubic: compared by mean below
]


@pytest.mark.parametrize("name, index, max_diff, fraction", CASES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_operation_is_pils(name, index, max_diff, fraction, sign):
    magnitude = float(aa.RANGES[name][index])
    run = jax.jit(lambda x, m, s: aa.as_uint8_values(aa.apply(name, x, m, s)))
    for kind, image in images().items():
        ours = np.asarray(run(jnp.asarray(image, jnp.float32), magnitude, sign))
        theirs = np.asarray(pil_op(name, Image.fromarray(image), magnitude, sign), np.float32)
        diff = np.abs(ours - theirs)
        assert diff.max() <= max_diff, (kind, diff.max())
        assert (diff > 0).mean() <= fraction, (kind, (diff > 0).mean())
        if name == "shearY" and kind == "smooth":
            assert diff.mean() < 3.0, diff.mean()
        if name not in ("invert", "brightness") and magnitude:
            assert np.abs(ours - image).max() > 0  # the operation did something


def test_the_policy_is_the_official_table():
    probs, ops, mags = aa.policy_arrays(aa.CIFAR10_POLICY)
    assert probs.shape == ops.shape == mags.shape == (25, 2)
    # Spot checks against utils/autoaugment.py: sub-policies 0, 5 and 24.
    assert [aa.OPERATIONS[o] for o in ops[0]] == ["invert", "contrast"]
    np.testing.assert_allclose(probs[0], [0.1, 0.2])
    np.testing.assert_allclose(mags[0, 1], 0.6)  # contrast index 6 of linspace(0, 0.9, 10)
    assert [aa.OPERATIONS[o] for o in ops[5]] == ["shearY", "posterize"] and mags[5, 1] == 5
    np.testing.assert_allclose(mags[24, 0], 150 / 331)
    with pytest.raises(ValueError, match="Unknown augment.autoaugment 'svhn'"):
        aa.autoaugment(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)), "svhn")


def test_the_policy_changes_images_as_its_probabilities_say(key):
    """Over many copies of one image, about the policy's expected share is left unchanged."""
    image = images()["smooth"]
    x = jnp.asarray(np.repeat(image[None], 2000, 0))
    out = np.asarray(jax.jit(aa.autoaugment)(key, x))
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255 and (out == np.round(out)).all()
    unchanged = (out == image).all((1, 2, 3)).mean()
    probs, _, _ = aa.policy_arrays(aa.CIFAR10_POLICY)
    expected = np.mean((1 - probs[:, 0]) * (1 - probs[:, 1]))  # neither operation runs
    # A few operations leave this image as it is even when they run (sign draws, etc.).
    assert expected - 0.03 <= unchanged <= expected + 0.08, (unchanged, expected)
    assert len({o.tobytes() for o in out}) > 50  # many different results


def test_augment_runs_autoaugment_between_brightness_and_cutout(key):
    x = jnp.asarray(np.repeat(images()["noisy"][None], 8, 0))
    spec = device.Augment(autoaugment="cifar10", cutout=8)
    out = np.asarray(jax.jit(device.augment, static_argnums=2)(key, x, spec))
    assert out.shape == x.shape
    assert ((out == 0).all(-1).sum((1, 2)) >= 16).all()  # every image has its cutout hole
    assert bool(spec) and not device.Augment()
