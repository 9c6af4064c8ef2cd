"""AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019) on the device, as the official FOSTER
code applies it to CIFAR-100 (G-U-N/ECCV22-FOSTER at 555c7f0: `utils/autoaugment.py` for the
policy and the magnitude ranges, `utils/ops.py` for the operations, PIL's).

Each image draws one of the 25 sub-policies; each of its two operations runs with its probability,
at its magnitude, with a random sign where the operation has one. Images are raw (0-255), rounded
to integers first and after every operation, as PIL's uint8 images are. Where this differs from
PIL: shearing samples bilinearly (PIL: bicubic); the other operations follow PIL's definitions
(tested against PIL in tests/test_autoaugment.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

FILL = 128.0  # the official code's fillcolor for pixels that come from outside the image

# Magnitude of each operation at index 0..9 (`SubPolicy.ranges`); translations are fractions of
# the image's size, rotations degrees, posterize bits, solarize thresholds.
RANGES = {
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10), 0),
    "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": np.zeros(10),
    "equalize": np.zeros(10),
    "invert": np.zeros(10),
}

# (probability, operation, magnitude index) twice per sub-policy: `CIFAR10Policy`.
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)
POLICIES = {"cifar10": CIFAR10_POLICY}


def grey(image_HWC: jax.Array) -> jax.Array:
    """PIL's convert('L') (ITU-R 601-2 luma), (H, W, 1); a one-channel image is its own."""
    if image_HWC.shape[-1] == 1:
        return image_HWC
    luma = image_HWC @ jnp.array([0.299, 0.587, 0.114], jnp.float32)
    return jnp.round(luma)[..., None]


def blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped and truncated to
    integers as PIL's Image.blend does for uint8 images."""
    return jnp.floor(jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0))


def affine(image_HWC: jax.Array, matrix, order: int) -> jax.Array:
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f)): the output pixel centred at (x, y) takes
    the input at (a x + b y + c, d x + e y + f); outside the image, FILL."""
    a, b, c, d, e, f = matrix
    h, w, _ = image_HWC.shape
    ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    src_x, src_y = a * xs + b * ys + c, d * xs + e * ys + f
    if order == 0:  # PIL's nearest: the pixel whose square holds the point
        ix, iy = jnp.floor(src_x).astype(jnp.int32), jnp.floor(src_y).astype(jnp.int32)
        inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        taken = image_HWC[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
        return jnp.where(inside[..., None], taken, FILL)

    def channel(ch):  # bilinear between pixel centres
        coords = [src_y - 0.5, src_x - 0.5]
        return ndimage.map_coordinates(ch, coords, order=order, mode="constant", cval=FILL)

    return jax.vmap(channel, in_axes=-1, out_axes=-1)(image_HWC)


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
    """PIL's Image.rotate (counter-clockwise about the centre, nearest neighbour)."""
    h, w, _ = image.shape
    angle = -degrees * (math.pi / 180)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = w / 2, h / 2
    c = cos * -cx + sin * -cy + cx
    f = -sin * -cx + cos * -cy + cy
    return affine(image, (cos, sin, c, -sin, cos, f), order=0)


def sharpness(image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border pixels kept)."""
    kernel = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13
    smooth = jax.vmap(
        lambda ch: jax.scipy.signal.convolve2d(ch, kernel, mode="valid"), in_axes=-1, out_axes=-1
    )(image)
    degenerate = image.at[1:-1, 1:-1].set(jnp.round(smooth))
    return blend(degenerate, image, factor)


def autocontrast(image: jax.Array) -> jax.Array:
    """PIL's ImageOps.autocontrast: each channel stretched from its [min, max] to [0, 255]."""
    lo, hi = image.min((0, 1), keepdims=True), image.max((0, 1), keepdims=True)
    scale = 255.0 / jnp.maximum(hi - lo, 1.0)
    stretched = jnp.clip(jnp.floor(image * scale - lo * scale), 0.0, 255.0)
    return jnp.where(hi > lo, stretched, image)


def equalize(image: jax.Array) -> jax.Array:
    """PIL's ImageOps.equalize: each channel's histogram equalised by PIL's lookup table."""

    def channel(ch):
        values = ch.astype(jnp.int32).ravel()
        hist = jnp.zeros(256, jnp.int32).at[values].add(1)
        step = (values.size - hist[values.max()]) // 255
        before = jnp.cumsum(hist) - hist  # pixels below each value
        lut = jnp.minimum((step // 2 + before) // jnp.maximum(step, 1), 255)
        return jnp.where(step > 0, lut[values].reshape(ch.shape).astype(ch.dtype), ch)

    return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def apply(name: str, image: jax.Array, magnitude, sign) -> jax.Array:
    """Operation `name` of `utils/ops.py` on one raw image (H, W, C) of integer values."""
    h, w, _ = image.shape
    m = magnitude * sign
    if name == "invert":
        return 255.0 - image
    if name == "posterize":
        bits = magnitude.astype(jnp.int32)
        return (image.astype(jnp.int32) >> (8 - bits) << (8 - bits)).astype(image.dtype)
    if name == "solarize":
        return jnp.where(image >= magnitude, 255.0 - image, image)
    if name == "autocontrast":
        return autocontrast(image)
    if name == "equalize":
        return equalize(image)
    if name == "brightness":
        return blend(jnp.zeros_like(image), image, 1 + m)
    if name == "color":
        return blend(jnp.broadcast_to(grey(image), image.shape), image, 1 + m)
    if name == "contrast":
        mean = jnp.floor(grey(image).mean() + 0.5)
        return blend(jnp.full_like(image, mean), image, 1 + m)
    if name == "sharpness":
        return sharpness(image, 1 + m)
    if name == "rotate":
        return rotate(image, m)
    if name == "translateX":
        return affine(image, (1, 0, m * w, 0, 1, 0), order=0)
    if name == "translateY":
        return affine(image, (1, 0, 0, 0, 1, m * h), order=0)
    if name == "shearY":
        return affine(image, (1, 0, 0, m, 1, 0), order=1)
    raise ValueError(f"Unknown AutoAugment operation {name!r}; known: {', '.join(RANGES)}.")


OPERATIONS = tuple(RANGES)


def as_uint8_values(image: jax.Array) -> jax.Array:
    """Rounded and clipped to 0-255, the values of a uint8 image (kept in float32)."""
    return jnp.clip(jnp.round(image), 0.0, 255.0)


def apply_any(op: jax.Array, image: jax.Array, magnitude, sign) -> jax.Array:
    """Operation number `op` (of OPERATIONS, traced), its result as a uint8 image's values."""
    branches = [lambda x, m, s, n=n: apply(n, x, m, s) for n in OPERATIONS]
    return as_uint8_values(jax.lax.switch(op, branches, image, magnitude, sign))


def policy_arrays(policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, 2) probabilities, operation numbers and magnitudes of a policy's sub-policies."""
    probs, ops, mags = [], [], []
    for p1, op1, i1, p2, op2, i2 in policy:
        probs.append((p1, p2))
        ops.append((OPERATIONS.index(op1), OPERATIONS.index(op2)))
        mags.append((RANGES[op1][i1], RANGES[op2][i2]))
    return np.array(probs, np.float32), np.array(ops, np.int32), np.array(mags, np.float32)


def autoaugment(rng: jax.Array, x_BHWC: jax.Array, policy: str = "cifar10") -> jax.Array:
    """Each raw image through one random sub-policy of `policy`; float32 values in 0-255."""
    if policy not in POLICIES:
        raise ValueError(f"Unknown augment.autoaugment {policy!r}; known: {', '.join(POLICIES)}.")
    probs, ops, mags = (jnp.asarray(a) for a in policy_arrays(POLICIES[policy]))
    b = x_BHWC.shape[0]
    choice_rng, apply_rng, sign_rng = jax.random.split(rng, 3)
    chosen = jax.random.randint(choice_rng, (b,), 0, len(probs))
    applied = jax.random.uniform(apply_rng, (b, 2)) < probs[chosen]
    signs = jnp.where(jax.random.bernoulli(sign_rng, 0.5, (b, 2)), 1.0, -1.0)
    x = as_uint8_values(x_BHWC.astype(jnp.float32))

    def one(image, op, mag, sign, use):
        for k in range(2):
            image = jnp.where(use[k], apply_any(op[k], image, mag[k], sign[k]), image)
        return image

    return jax.vmap(one)(x, ops[chosen], mags[chosen], signs, applied)
