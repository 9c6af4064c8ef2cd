"""Image folders as torchvision's `ImageFolder` and Keras's `image_dataset_from_directory` read them:
one sub-directory per class, named after its class. `sources.load_folder` (the `folder:PATH` data
source) lists, decodes and caches a folder with the functions here.

Two layouts are read:

    PATH/train/<class>/..., PATH/test/<class>/...   the splits as given (the same class names);
    PATH/<class>/...                                 each class split here: a `holdout` fraction of
                                                     its files to test, the rest to train.

The class ids are the sorted class names, 0..K-1, as torchvision numbers them. Every file under a
class directory (its sub-directories too) whose extension is one of IMAGE_EXTENSIONS, in any case,
is an image; other files are counted in one warning, and names that start with '.' are skipped.
The held-out split takes each class's files sorted by path and draws its test files with a numpy
Generator seeded with (seed, the class name): the same split on every machine, whatever order the
filesystem lists files in, and files added to one class leave the other classes' splits alone.

Images are decoded with Pillow (`decode_image`) straight into one preallocated uint8 array per
split, so a large folder never holds more than one decoded image beside those arrays.
`sources.load_folder` caches the arrays under `fingerprint` (every image's path, size and
modification time, and the arguments): a second load reads them in a moment, and any change of the
folder decodes it again. A cached folder is an ordinary array source, so `dataset.stream=True`
streams its training batches from host memory like the other array sources.

This module imports nothing else of the package, so that `sources` can import it, and does so only
when a folder is loaded: Pillow is not imported otherwise.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import PIL
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Part of every fingerprint: change it when listing, splitting or decoding changes, so that the
# caches of the old rules are not read.
FORMAT = "folder1"

_SHOWN = 5  # paths named in a warning

# What Pillow raises for a file it cannot decode (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An image file that Pillow cannot decode."""


class Listing(NamedTuple):
    """An image folder's files, split and labelled; paths relative to `root`, sorted."""

    root: str
    class_names: tuple[str, ...]  # class k is class_names[k]
    train: tuple[tuple[str, int], ...]  # (path, class id)
    test: tuple[tuple[str, int], ...]
    ignored: tuple[str, ...]  # files in the class directories that are not images


def check_arguments(*, image_size: int, holdout: float, seed: int) -> None:
    """Refuses arguments of the wrong type or out of range, naming them."""
    for name, value in (("image_size", image_size), ("seed", seed)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if not isinstance(holdout, int | float | np.floating) or isinstance(holdout, bool):
        raise TypeError(f"holdout must be a float, got {type(holdout).__name__} {holdout!r}.")
    if not 0 < holdout < 1:
        raise ValueError(
            f"holdout must be between 0 and 1 (the fraction of each class's images held out to "
            f"test), got {holdout}."
        )


def list_folder(path: str, *, holdout: float, seed: int) -> Listing:
    """The images of the folder at `path`, split into train and test (see the module docstring).

    Warns once about the files that are not images. Raises a ValueError for a missing folder, a
    folder without class directories, a class without images (or, to be split here, with fewer
    than 2), and for train/ and test/ with different classes.
    """
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise ValueError(
            f"Image folder {path!r} {what}; folder:PATH needs a directory with one sub-directory "
            f"of images per class (or train/ and test/ holding those)."
        )
    given = [os.path.isdir(os.path.join(path, split)) for split in ("train", "test")]
    if all(given):
        listing = _given_splits(path)
    elif any(given):
        has, lacks = ("train", "test") if given[0] else ("test", "train")
        raise ValueError(
            f"{path} has a {has}/ directory but no {lacks}/: give both splits as "
            f"{has}/<class>/ and {lacks}/<class>/, or put the class directories directly in {path} "
            f"to have each class split (a class cannot be named train or test)."
        )
    else:
        listing = _held_out_splits(path, holdout, seed)
    if listing.ignored:
        warnings.warn(
            f"{path}: ignored {len(listing.ignored)} files that are not images (extensions "
            f"{' '.join(IMAGE_EXTENSIONS)}): {_some(listing.ignored)}.",
            stacklevel=2,
        )
    return listing


def _given_splits(root: str) -> Listing:
    """The listing of PATH/train/<class>/... and PATH/test/<class>/..."""
    names = {split: _class_dirs(os.path.join(root, split)) for split in ("train", "test")}
    only_train = sorted(set(names["train"]) - set(names["test"]))
    only_test = sorted(set(names["test"]) - set(names["train"]))
    if only_train or only_test:
        problems = [
            f"{split}/ lacks {', '.join(map(repr, missing))}"
            for split, missing in (("test", only_train), ("train", only_test))
            if missing
        ]
        raise ValueError(
            f"{root}: train/ and test/ must hold the same class directories; "
            f"{'; '.join(problems)}. Add the missing classes' images or remove those classes."
        )
    files: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    ignored: list[str] = []
    for label, name in enumerate(names["train"]):
        for split in ("train", "test"):
            images, others = _class_files(root, os.path.join(split, name))
            files[split] += [(f, label) for f in images]
            ignored += others
    train, test = (tuple(files[split]) for split in ("train", "test"))
    return Listing(root, tuple(names["train"]), train, test, tuple(ignored))


def _held_out_splits(root: str, holdout: float, seed: int) -> Listing:
    """The listing of PATH/<class>/..., each class's files split by `_held_out`."""
    names = _class_dirs(root)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    ignored: list[str] = []
    for label, name in enumerate(names):
        images, others = _class_files(root, name)
        ignored += others
        if len(images) < 2:
            raise ValueError(
                f"{root}: class {name!r} ({os.path.join(root, name)}) has 1 image; splitting it "
                f"into train and test needs at least 2. Add images, or give the splits as "
                f"{root}/train/<class>/ and {root}/test/<class>/."
            )
        is_test = _held_out(len(images), holdout, seed, name)
        train += [(f, label) for f, held in zip(images, is_test, strict=True) if not held]
        test += [(f, label) for f, held in zip(images, is_test, strict=True) if held]
    return Listing(root, tuple(names), tuple(train), tuple(test), tuple(ignored))


def _held_out(count: int, holdout: float, seed: int, name: str) -> np.ndarray:
    """Which of a class's `count` sorted files are test files: round(holdout * count) of them,
    at least 1 and at most count - 1, drawn with a Generator seeded with (seed, the class name)."""
    num_test = min(max(int(holdout * count + 0.5), 1), count - 1)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    is_test = np.zeros(count, bool)
    is_test[rng.permutation(count)[:num_test]] = True
    return is_test


def _class_dirs(directory: str) -> list[str]:
    """The sorted names of the class directories in `directory` (hidden ones left out)."""
    names = sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise ValueError(
            f"{directory} has no class sub-directories; put each class's images in a directory "
            f"named after the class, {directory}/<class>/."
        )
    return names


def _class_files(root: str, class_dir: str) -> tuple[list[str], list[str]]:
    """The image files and the other files under `root/class_dir`, relative to `root`, sorted.

    Sub-directories are searched too (symbolic links to directories are not followed); names that
    start with '.' are skipped. A class directory without images is refused, naming it.
    """
    images, others = [], []
    for folder, dirs, files in os.walk(os.path.join(root, class_dir)):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = os.path.relpath(os.path.join(folder, name), root)
                (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    if not images:
        raise ValueError(
            f"{root}: the class directory {class_dir!r} holds no images (files named *"
            f"{' *'.join(IMAGE_EXTENSIONS)}); add its images or remove the directory."
        )
    return sorted(images), sorted(others)


def fingerprint(listing: Listing, **arguments) -> str:
    """A hash of every image's path, size and modification time (ns) and of `arguments`: any
    change of the folder's images, or of how they are read, gives another fingerprint."""
    digest = hashlib.blake2b(digest_size=12)
    options = sorted((k, repr(v)) for k, v in arguments.items())
    digest.update(f"{FORMAT} pillow {PIL.__version__} {options}\n".encode())
    for path in sorted(f for f, _ in listing.train + listing.test):
        try:
            stat = os.stat(os.path.join(listing.root, path))
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:  # a dangling link: decoding reports it
            size = mtime = -1
        digest.update(f"{path}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def cache_name(path: str, **arguments) -> str:
    """The name of the cache files of a folder read with `arguments`: the same for every version
    of the folder's images (`fingerprint` tells them apart)."""
    options = sorted((k, repr(v)) for k, v in arguments.items())
    key = f"{os.path.realpath(path)}\0{options}".encode()
    return f"folder-{hashlib.blake2b(key, digest_size=8).hexdigest()}"


def decode_image(path: str, image_size: int) -> np.ndarray:
    """The image file at `path` as uint8 (H, W, 3) RGB, resized to image_size x image_size if set.

    Every mode becomes RGB by Pillow's `Image.convert("RGB")`: grayscale ("L", "I;16", ...) is
    repeated over the channels, palette ("P") is looked up, CMYK is converted, and an alpha channel
    ("LA", "RGBA") is dropped without compositing over a background. 16-bit values are clipped to
    255, not rescaled: convert such images to 8 bits first to keep their range. Of a multi-frame
    file (GIF, TIFF) the first frame is read; EXIF orientation is not applied (as torchvision).
    An image of another size is resized with Pillow's `Image.resize` and its bilinear filter (which
    widens to cover every source pixel when shrinking), without keeping the aspect ratio.

    Raises `BadImageError` (a ValueError) naming the file when Pillow cannot decode it.
    """
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except _DECODE_ERRORS as error:
        raise BadImageError(
            f"{path} cannot be decoded as an image ({type(error).__name__}: {error}); replace or "
            f"remove it, or set dataset.skip_bad_files=True to skip the files that cannot be read."
        ) from None
    if image_size and rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_folder(listing: Listing, *, image_size: int, skip_bad: bool) -> tuple[np.ndarray, ...]:
    """The listing's images decoded: x_train, y_train, x_test, y_test, the class names and the
    skipped files (unicode arrays), as `sources.load_folder` caches them.

    With `image_size=0` every image keeps its size, which must then be the same for all. With
    `skip_bad`, files that cannot be decoded are left out (and listed); a class left with no train
    or no test image is refused.
    """
    arrays: list[np.ndarray] = []
    skipped: list[str] = []
    first = None  # (path, (height, width)) of the first image decoded
    for files in (listing.train, listing.test):
        x, y, bad, first = _decode_split(listing.root, files, image_size, skip_bad, first)
        arrays += [x, y]
        skipped += bad
    _check_every_class_left(listing, arrays[1], arrays[3], len(skipped))
    return (*arrays, np.array(listing.class_names, dtype=str), np.array(skipped, dtype=str))


def _decode_split(
    root: str,
    files: Sequence[tuple[str, int]],
    image_size: int,
    skip_bad: bool,
    first: tuple[str, tuple[int, ...]] | None,
) -> tuple[np.ndarray, np.ndarray, list[str], tuple[str, tuple[int, ...]] | None]:
    """One split's images, decoded into one preallocated array, and its labels; the files skipped,
    and `first` (set by the first image decoded) to compare the next images' sizes with."""
    side = image_size or 1
    x = np.zeros((len(files), side, side, 3), np.uint8) if image_size else None
    labels: list[int] = []
    skipped: list[str] = []
    for path, label in files:
        try:
            image = decode_image(os.path.join(root, path), image_size)
        except BadImageError:
            if not skip_bad:
                raise
            skipped.append(path)
            continue
        if first is None:
            first = (path, image.shape[:2])
        if image.shape[:2] != first[1]:
            raise ValueError(
                f"{root}: the images differ in size, {first[0]} is {_size(first[1])} but {path} is "
                f"{_size(image.shape[:2])}; set dataset.image_size (e.g. "
                f"--config.dataset.image_size=32) to resize every image to one square size."
            )
        if x is None:
            x = np.zeros((len(files), *image.shape), np.uint8)
        x[len(labels)] = image
        labels.append(label)
    if x is None:  # nothing decoded: every file skipped
        x = np.zeros((0, side, side, 3), np.uint8)
    return x[: len(labels)], np.array(labels, np.int32), skipped, first


def _size(height_width: tuple[int, ...]) -> str:
    return f"{height_width[1]}x{height_width[0]} (width x height)"


def _check_every_class_left(
    listing: Listing, y_train: np.ndarray, y_test: np.ndarray, num_skipped: int
) -> None:
    """Refuses classes that skipping undecodable files left without train or test images."""
    problems = [
        f"{split} lacks {', '.join(repr(listing.class_names[k]) for k in missing)}"
        for split, y in (("train", y_train), ("test", y_test))
        if len(missing := np.setdiff1d(np.arange(len(listing.class_names)), y))
    ]
    if problems:
        raise ValueError(
            f"{listing.root}: after skipping {num_skipped} files that cannot be decoded, "
            f"{'; '.join(problems)}. Every class needs train and test images: replace the bad "
            f"files."
        )


def warn_skipped(path: str, skipped: Sequence[str]) -> None:
    """One warning naming how many undecodable files were skipped, and some of them."""
    if len(skipped):
        warnings.warn(
            f"{path}: skipped {len(skipped)} files that cannot be decoded as images "
            f"(dataset.skip_bad_files=True): {_some(skipped)}.",
            stacklevel=2,
        )


def _some(paths: Sequence[str]) -> str:
    """Up to _SHOWN of `paths`, and how many more."""
    shown = ", ".join(str(p) for p in paths[:_SHOWN])
    return f"{shown}{f' and {len(paths) - _SHOWN} more' if len(paths) > _SHOWN else ''}"
