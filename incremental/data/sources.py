"""Data sources: whole datasets as numpy arrays with their original class ids."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import random
import re
import zipfile
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

SOURCES: tuple[str, ...] = ("digits", "mnist1d", "tfds:NAME", "npz:PATH", "folder:PATH")

NPZ_KEYS: tuple[str, ...] = ("x_train", "y_train", "x_test", "y_test")
NPZ_CLASS_NAMES = "class_names"  # an optional array of the .npz: one name per class

# Records read per `__getitems__` call: batched reads are about twice as fast as single reads.
_TFDS_CHUNK = 1024


class Source(NamedTuple):
    """A dataset split into train and test, labelled with original class ids.

    Images are uint8 (N, H, W, C) with `is_image=True`; feature vectors are float32 (N, D)
    with `is_image=False`. Labels are int32 (N,) in [0, num_classes). `class_names[k]` names
    class k where the source knows the names (image folders, an .npz with `class_names`).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str
    is_image: bool
    class_names: tuple[str, ...] | None = None
    # The stored value of full intensity where it is not the dtype's convention (`full_intensity`):
    # scikit-learn's digits are uint8 from 0 to 16.
    max_value: float | None = None


def full_intensity(x: np.ndarray, max_value: float | None = None) -> float:
    """The stored value of white in images `x`: the source's own `max_value` where it declares one,
    else the dtype's convention, 255 for uint8 images and 1 for float images (in [0, 1])."""
    if max_value is not None:
        if not max_value > 0:
            raise ValueError(f"A source's max_value must be positive, got {max_value!r}.")
        return float(max_value)
    return 255.0 if x.dtype == np.uint8 else 1.0


def load_source(
    name: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    seed: int = 0,
    remap_labels: bool = False,
    image_size: int = 0,
    holdout: float = 0.2,
    skip_bad: bool = False,
) -> Source:
    """Loads a whole dataset into memory.

    Args:
      name: "digits" (scikit-learn 8x8 digits), "mnist1d" (generated locally), "tfds:NAME"
        (a TFDS dataset prepared in array_record format, e.g. "tfds:cifar100"), "npz:PATH"
        (a .npz file with arrays x_train, y_train, x_test, y_test) or "folder:PATH" (a directory
        of images, one sub-directory per class; `load_folder`).
      data_dir: TFDS data directory; None uses the TFDS default. Only used by "tfds:".
      download: let TFDS download and prepare a missing dataset (needs TensorFlow and
        network). Only used by "tfds:".
      seed: accepted so every source has the same call signature; all current sources are
        deterministic (fixed splits, fixed generator seed) and do not use it. A folder's held-out
        split too is drawn with `load_folder`'s fixed seed 0, and a TEST_ONLY TFDS dataset's with
        seed 0, not this one: every run seed (and every seed of `config.seeds`, which share one
        load) is tested on the same images.
      remap_labels: for "npz:", renumber the class ids present (sorted) as 0..K-1 instead of
        refusing ids that are not (`label_contract`).
      image_size: for "folder:", resize every image to image_size x image_size (0: keep the
        native size, which must then be the same for every image); for "tfds:", resize each
        image's shorter side to image_size and keep the central square (`square_image`), which
        datasets of images of varying sizes need.
      holdout: for "folder:" without train/ and test/ sub-directories and for the TFDS datasets
        of TEST_ONLY, the fraction of each class's images held out to test.
      skip_bad: for "folder:", skip (and warn about) files that cannot be decoded instead of
        refusing the folder.

    Returns:
      The dataset as a `Source`.
    """
    del seed
    if name == "digits":
        return _load_digits()
    if name == "mnist1d":
        return _load_mnist1d()
    kind, _, arg = name.partition(":")
    if kind == "tfds" and arg:
        return _load_tfds(
            arg, data_dir=data_dir, download=download, image_size=image_size, holdout=holdout
        )
    if kind == "npz" and arg:
        return _load_npz(arg, remap_labels)
    if kind == "folder" and arg:
        return load_folder(arg, image_size=image_size, holdout=holdout, skip_bad=skip_bad)
    raise ValueError(f"Unknown data source {name!r}; valid sources are {', '.join(SOURCES)}.")


def cache_root() -> str:
    """`$INCREMENTAL_CACHE`, by default ~/.cache/incremental: generated data, compiled programs."""
    return os.environ.get("INCREMENTAL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "incremental"
    )


def _disk_cached(name: str, version: str, build: Callable[[], tuple[np.ndarray, ...]]):
    """`build()`'s arrays, kept in `$INCREMENTAL_CACHE` (default ~/.cache/incremental) by version.

    Building imports scikit-learn or generates MNIST-1D, which takes seconds; reading the cached,
    identical arrays takes milliseconds, so a command that fails on bad input fails fast. Where the
    cache cannot be written, the arrays are simply rebuilt each time.
    """
    root = cache_root()
    path = os.path.join(root, f"{name}-{version}.npz")
    try:
        with np.load(path) as data:
            return tuple(data[f"a{i}"] for i in range(len(data.files)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass  # missing, or damaged (a truncated file): built again and written over
    arrays = build()
    try:
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **{f"a{i}": a for i, a in enumerate(arrays)})
        os.replace(tmp, path)  # readers never see a half-written file
    except OSError:
        pass
    return arrays


def load_folder(
    path: str, *, image_size: int, holdout: float = 0.2, seed: int = 0, skip_bad: bool = False
) -> Source:
    """A directory of images, one sub-directory per class, as a `Source` with its class names.

    The layouts, class ids, split and decoding are those of `incremental.data.folder`. The decoded
    arrays are cached by `_disk_cached` under the folder's `folder.fingerprint`, so a second load
    reads them instead of decoding, and any change of the images (or of the arguments) decodes
    them again; the cache file of the folder's previous images, read with the same arguments, is
    removed then.

    Args:
      path: the folder, holding train/<class>/ and test/<class>/, or the <class>/ directories.
      image_size: resize every image to image_size x image_size; 0 keeps the native size, which
        must then be the same for every image.
      holdout: without train/ and test/, the fraction of each class's images held out to test.
      seed: the seed of the held-out split.
      skip_bad: skip files that cannot be decoded (warning how many) instead of refusing them.
    """
    from incremental.data import folder  # Imported here: it imports Pillow, only folders need it.

    folder.check_arguments(image_size=image_size, holdout=holdout, seed=seed)
    listing = folder.list_folder(path, holdout=holdout, seed=seed)
    arguments = {"image_size": image_size, "holdout": holdout, "seed": seed, "skip_bad": skip_bad}
    name, version = folder.cache_name(path, **arguments), folder.fingerprint(listing, **arguments)

    def build():
        _remove_other_versions(name, version)  # a large folder's stale cache is large too
        return folder.decode_folder(listing, image_size=image_size, skip_bad=skip_bad)

    x_train, y_train, x_test, y_test, names, skipped = _disk_cached(name, version, build)
    folder.warn_skipped(path, skipped.tolist())
    class_names = tuple(str(n) for n in names.tolist())
    source_name = f"folder:{path}"
    return Source(
        x_train, y_train, x_test, y_test, len(class_names), source_name, True, class_names
    )


def _remove_other_versions(name: str, version: str) -> None:
    """Removes the cache files `_disk_cached` wrote for `name` under versions other than `version`."""
    root = cache_root()
    pattern = re.compile(rf"{re.escape(name)}-[0-9a-f]+\.npz")
    try:
        names = os.listdir(root)
    except OSError:
        return  # no cache directory yet
    for filename in names:
        if pattern.fullmatch(filename) and filename != f"{name}-{version}.npz":
            # Removed by another process first, or not ours to remove: left alone.
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, filename))


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _load_digits() -> Source:
    """Scikit-learn's 8x8 digits with a fixed stratified 80/20 split."""

    def build():
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.images.astype(np.uint8)[..., None]  # Values 0..16, kept unscaled.
        y = digits.target.astype(np.int32)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=0
        )
        return x_train, y_train, x_test, y_test

    version = f"sklearn{_package_version('scikit-learn')}-split1"
    x_train, y_train, x_test, y_test = _disk_cached("digits", version, build)
    return Source(x_train, y_train, x_test, y_test, 10, "digits", True, max_value=16.0)


def _load_mnist1d() -> Source:
    """MNIST-1D as generated by the mnist1d package with its default arguments."""
    x_train, y_train, x_test, y_test = _mnist1d_arrays()
    # Copies, so that a caller mutating its arrays cannot corrupt the cache.
    return Source(
        x_train.copy(), y_train.copy(), x_test.copy(), y_test.copy(), 10, "mnist1d", False
    )


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D, generated once (about two seconds) and then read from the disk cache."""
    version = f"mnist1d{_package_version('mnist1d')}-defaults1"
    return _disk_cached("mnist1d", version, _generate_mnist1d)


def _generate_mnist1d() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global numpy and python RNGs; restore both for the caller.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return (
        data["x"].astype(np.float32),
        data["y"].astype(np.int32),
        data["x_test"].astype(np.float32),
        data["y_test"].astype(np.int32),
    )


def _prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares a TFDS dataset for `load_source`."""
    dir_flag = f" --data_dir {data_dir}" if data_dir else ""
    return f"pip install -e '.[prepare]' && python scripts/prepare_tfds.py {name}{dir_flag}"


def tfds_data_source(name: str, *, data_dir: str | None, download: bool = False, **kwargs):
    """`tfds.data_source(name, ...)`, with a missing or unprepared dataset as a clear ValueError.

    With download=False it never touches the network, so a missing dataset fails in milliseconds.
    """
    import tensorflow_datasets as tfds  # Imported here: only "tfds:" sources need it.

    try:
        return tfds.data_source(
            name,
            data_dir=data_dir,
            download=download,
            # Without this, a download into an explicit data_dir is written as unreadable TFRecord.
            download_and_prepare_kwargs={"file_format": "array_record"} if download else None,
            **kwargs,
        )
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"TFDS has no dataset {name!r}; see https://www.tensorflow.org/datasets/catalog."
        ) from e
    # Which error TFDS raises for missing data depends on data_dir and on what is on disk.
    except (AssertionError, FileNotFoundError, KeyError, NotImplementedError) as e:
        where = data_dir or "the default TFDS data_dir"
        raise ValueError(
            f"TFDS dataset {name!r} is not prepared in array_record format in {where}. "
            f"Prepare it once (needs TensorFlow and network) with:\n"
            f"  {_prepare_command(name, data_dir)}\nTFDS said: {type(e).__name__}: {e}"
        ) from e


# TFDS datasets that have only a test split (ImageNet-R, ImageNet-A: 200 of ImageNet's classes):
# `_load_tfds` holds out a fraction of each class of it to test and trains on the rest, as
# DualPrompt and PILOT split ImageNet-R 80/20; their class ids become 0..199 in ImageNet's order.
TEST_ONLY: tuple[str, ...] = ("imagenet_r", "imagenet_a")


def _load_tfds(
    name: str, *, data_dir: str | None, download: bool, image_size: int = 0, holdout: float = 0.2
) -> Source:
    """Reads the train and test splits of a TFDS dataset through `tfds.data_source`; of a
    TEST_ONLY dataset, its test split divided per class (`holdout`, seed 0)."""
    test_only = re.split(r"[:/]", name)[0] in TEST_ONLY
    splits = tfds_data_source(
        name, split=["test"] if test_only else ["train", "test"], data_dir=data_dir,
        download=download,
    )  # fmt: skip
    features = splits[0].dataset_info.features
    _check_tfds_features(name, features, image_size)
    arrays = [_read_tfds_split(split, image_size) for split in splits]
    num_classes = int(features["label"].num_classes)
    if not test_only:
        (x_train, y_train), (x_test, y_test) = arrays
        return Source(x_train, y_train, x_test, y_test, num_classes, f"tfds:{name}", True)
    (x, y), where = arrays[0], f"tfds:{name}"
    whole = Source(x, y, x[:0], y[:0], num_classes, where, True)
    split = validation_split(whole, holdout, seed=0)
    y_train, y_test, num_classes = label_contract(split.y_train, split.y_test, where, remap=True)
    return split._replace(y_train=y_train, y_test=y_test, num_classes=num_classes)


def _check_tfds_features(name: str, features: Any, image_size: int) -> None:
    """Refuses a TFDS dataset that `_load_tfds` cannot read as uint8 images and class labels."""
    for key in ("image", "label"):
        if key not in features:
            raise ValueError(
                f"TFDS dataset {name!r} has features {sorted(features.keys())}; "
                f"load_source needs 'image' and 'label'."
            )
    if features["image"].np_dtype != np.uint8:
        raise ValueError(
            f"TFDS dataset {name!r} has {features['image'].np_dtype} images; "
            f"load_source reads uint8 images only."
        )
    if None in features["image"].shape[:2] and not image_size:
        raise ValueError(
            f"TFDS dataset {name!r} has images of varying sizes; set dataset.image_size (e.g. "
            "--config.dataset.image_size=224) to resize them to one square side."
        )


def square_image(image: np.ndarray, side: int) -> np.ndarray:
    """An (H, W, C) uint8 image with its shorter side resized to `side` (bicubic, as PILOT's test
    transform resizes) and the central side x side square kept: torchvision's Resize(side) then
    CenterCrop(side)."""
    from PIL import Image  # Imported here: only sources that resize need Pillow.

    h, w = image.shape[:2]
    scale = side / min(h, w)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))  # PIL's (width, height)
    channels = image.shape[2]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize(size, Image.Resampling.BICUBIC)).reshape(
        size[1], size[0], channels
    )
    top, left = (size[1] - side) // 2, (size[0] - side) // 2
    return resized[top : top + side, left : left + side]


def _read_tfds_split(data_source: Any, image_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reads every (image, label) pair of a TFDS data source into uint8/int32 arrays, each image
    made image_size x image_size by `square_image` where image_size is set."""
    images, labels = [], []
    for start in range(0, len(data_source), _TFDS_CHUNK):
        keys = list(range(start, min(start + _TFDS_CHUNK, len(data_source))))
        for example in _read_records(data_source, keys):
            image = np.asarray(example["image"], dtype=np.uint8)
            images.append(square_image(image, image_size) if image_size else image)
            labels.append(example["label"])
    if not images:
        raise ValueError(f"TFDS data source {data_source!r} is empty.")
    return np.stack(images), np.asarray(labels, dtype=np.int32)


def _read_records(data_source: Any, keys: Sequence[int]) -> Sequence[dict[str, Any]]:
    """Reads records by batch, or one by one where batch reading is unavailable."""
    try:
        return data_source.__getitems__(keys)
    # tfds.testing.mock_data (tfds 4.9.10) installs a `__getitems__` that cannot be called.
    except (AttributeError, TypeError):
        return [data_source[k] for k in keys]


def _load_npz(path: str, remap_labels: bool = False) -> Source:
    """Loads and validates a user's .npz file with x_train, y_train, x_test, y_test."""
    arrays = _read_npz(path)
    x_train, x_test = (_check_features(arrays[k], k) for k in ("x_train", "x_test"))
    y_train, y_test = (_check_labels(arrays[k], k) for k in ("y_train", "y_test"))
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise ValueError(
                f"{path}: x_{split} has {len(x)} examples but y_{split} has {len(y)} labels."
            )
        if not len(x):
            raise ValueError(f"{path}: x_{split} is empty.")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{path}: x_train examples have shape {x_train.shape[1:]} but x_test examples have "
            f"shape {x_test.shape[1:]}; they must match."
        )
    y_train, y_test, num_classes = label_contract(y_train, y_test, path, remap_labels)
    names = _check_class_names(arrays.get(NPZ_CLASS_NAMES), num_classes, path, remap_labels)
    name = f"npz:{path}"
    return Source(x_train, y_train, x_test, y_test, num_classes, name, x_train.ndim == 4, names)


def _check_class_names(
    names: np.ndarray | None, num_classes: int, path: str, remap: bool
) -> tuple[str, ...] | None:
    """An .npz's optional `class_names`: one string per class, name k for class id k (with
    `remap`, for the k-th smallest id present, which becomes class k)."""
    if names is None:
        return None
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(
            f"{path}: class_names has dtype {names.dtype} and shape {names.shape}; save one "
            f"string per class, e.g. class_names=np.array(['cat', 'dog'])."
        )
    if len(names) != num_classes:
        which = "the k-th smallest class id present" if remap else "class id k"
        raise ValueError(
            f"{path}: class_names has {len(names)} names but the labels have {num_classes} "
            f"classes; save one name per class, name k for {which}."
        )
    return tuple(n.decode(errors="replace") if isinstance(n, bytes) else n for n in names.tolist())


def label_contract(
    y_train: np.ndarray, y_test: np.ndarray, where: str, remap: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """The labels of a user's data as class ids 0..K-1, every class in both splits.

    Ids that leave gaps (`{3, 7, 100}` would make a 101-column head for 3 classes), test classes
    never trained on, and trained classes never tested are refused with the ids named; with
    `remap` the ids present in `y_train` are renumbered 0..K-1 in sorted order (class k is the k-th
    smallest id) and only the test-side mismatches are refused. Nothing is allocated per id value,
    so a stray id of 2,000,000,000 costs nothing.
    """
    train_ids, test_ids = np.unique(y_train), np.unique(y_test)
    untrained = np.setdiff1d(test_ids, train_ids)
    untested = np.setdiff1d(train_ids, test_ids)
    gaps = np.array([], np.int64) if remap else np.setdiff1d(np.arange(len(train_ids)), train_ids)
    problems = [
        f"{what} {_ids(ids)}"
        for what, ids in (
            ("y_test has classes that y_train lacks:", untrained),
            ("y_train has classes that y_test lacks (they could not be scored):", untested),
            (f"the ids are not 0..{len(train_ids) - 1}; missing", gaps),
        )
        if len(ids)
    ]
    if problems:
        fix = "" if remap else " Set dataset.remap_labels=True to renumber the ids present."
        raise ValueError(f"{where}: {'; '.join(problems)}.{fix}")
    if remap:
        y_train, y_test = (
            np.searchsorted(train_ids, y).astype(np.int32) for y in (y_train, y_test)
        )
    return y_train, y_test, len(train_ids)


def _ids(ids: np.ndarray) -> str:
    shown = ", ".join(str(i) for i in ids[:10])
    return f"{shown}{f' ... ({len(ids)} in all)' if len(ids) > 10 else ''}"


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Reads the four required arrays of an .npz file, and `class_names` where it has one."""
    if not os.path.isfile(path):
        raise ValueError(f"npz file {path!r} not found (expected arrays {', '.join(NPZ_KEYS)}).")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"Could not read {path!r} as an .npz file: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} holds a single array; save the four arrays with np.savez.")
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise ValueError(
                f"{path}: missing arrays {missing}; found {sorted(npz.files)}, "
                f"required {list(NPZ_KEYS)}."
            )
        keys = (*NPZ_KEYS, NPZ_CLASS_NAMES) if NPZ_CLASS_NAMES in npz.files else NPZ_KEYS
        return {k: _read_npz_array(npz, k, path) for k in keys}


def _read_npz_array(npz: np.lib.npyio.NpzFile, key: str, path: str) -> np.ndarray:
    """Reads one array, refusing pickled object arrays."""
    try:
        return npz[key]
    except ValueError as e:
        raise ValueError(f"{path}: cannot read {key}: {e}") from e


def _check_features(x: np.ndarray, key: str) -> np.ndarray:
    """Validates inputs: (N, D) features or (N, H, W[, C]) images; uint8 images stay uint8."""
    if x.ndim not in (2, 3, 4):
        raise ValueError(
            f"{key} has shape {x.shape}; expected (N, D) features, (N, H, W) or (N, H, W, C) "
            f"images."
        )
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ValueError(f"{key} has non-numeric dtype {x.dtype}.")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(
            f"{key} has complex dtype {x.dtype}; models take real inputs: save the real and "
            "imaginary parts (or the magnitude) as real features."
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype == np.uint8 and x.ndim == 4:
        return x
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
        raise ValueError(f"{key} contains NaN or infinite values; clean or impute them first.")
    cast = x.astype(np.float32)
    if not np.isfinite(cast).all():  # beyond float32's range (about 3.4e38)
        raise ValueError(
            f"{key} has values of magnitude up to {np.abs(x).max():.3g}, beyond float32's range, "
            "which the models compute in; rescale them first."
        )
    return cast


def _check_labels(y: np.ndarray, key: str) -> np.ndarray:
    """Validates labels: 1-D, integral, non-negative; returns them as int32."""
    if y.ndim != 1:
        raise ValueError(f"{key} has shape {y.shape}; expected class ids of shape (N,).")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and np.all(y == np.round(y))):
            raise ValueError(f"{key} must hold integer class ids; got non-integral floats.")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{key} must hold integer class ids; got dtype {y.dtype}.")
    if len(y) and y.min() < 0:
        raise ValueError(f"{key} has negative class ids (min {y.min()}); ids must be >= 0.")
    if len(y) and y.max() > np.iinfo(np.int32).max:
        raise ValueError(f"{key} has class ids above the int32 range (max {y.max()}).")
    return y.astype(np.int32)


def validation_split(source: Source, fraction: float, seed: int = 0) -> Source:
    """The source with a validation split in place of its test split: `fraction` of each class's
    training examples (at least one where the class has two), drawn with a seed from (seed, class),
    become the test examples, and training keeps the rest in its order. A run on it never sees the
    real test set, so hyper-parameters chosen on its numbers (`incremental sweep --select`) are
    chosen without it (FACIL's protocol: a validation part of each phase's training data)."""
    held = []
    for c in np.unique(source.y_train):
        mine = np.flatnonzero(source.y_train == c)
        count = min(len(mine) - 1, max(1, round(fraction * len(mine))))
        held.append(np.random.default_rng((seed, int(c))).permutation(mine)[:count])
    held = np.sort(np.concatenate(held))
    kept = np.setdiff1d(np.arange(len(source.y_train)), held)
    return source._replace(
        x_train=source.x_train[kept], y_train=source.y_train[kept],
        x_test=source.x_train[held], y_test=source.y_train[held],
    )  # fmt: skip


def subset_classes(source: Source, spec: str, seed: int = 1993) -> Source:
    """Keeps only some classes and relabels them 0..K-1 in the order given (`class_names` too).

    Args:
      source: the loaded dataset.
      spec: `""` (all classes), `"seeded:K"` (the first K classes of the numpy permutation from
        `seed`, as UCIR/PODNet's ImageNet-Subset), or explicit ids `"3,5,7"`.
      seed: the permutation seed for `"seeded:K"`.
    """
    if not spec:
        return source
    if spec.startswith("seeded:"):
        count = int(spec.split(":", 1)[1])
        if not 0 < count <= source.num_classes:
            raise ValueError(
                f"dataset.classes={spec!r} asks for {count} of {source.num_classes} classes."
            )
        keep = np.random.RandomState(seed).permutation(source.num_classes)[:count]
    else:
        try:
            keep = np.array([int(c) for c in spec.split(",") if c.strip()])
        except ValueError:
            raise ValueError(
                f"dataset.classes={spec!r} is not 'seeded:K' or comma-separated class ids."
            ) from None
        bad = sorted(set(keep[(keep < 0) | (keep >= source.num_classes)].tolist()))
        if bad or len(set(keep.tolist())) != len(keep):
            raise ValueError(
                f"dataset.classes={spec!r} must name distinct ids in 0..{source.num_classes - 1}"
                f"{f'; not {bad}' if bad else ''}."
            )
    lookup = np.full(source.num_classes, -1, np.int32)
    lookup[keep] = np.arange(len(keep), dtype=np.int32)
    train, test = lookup[source.y_train] >= 0, lookup[source.y_test] >= 0
    names = source.class_names
    return source._replace(
        x_train=source.x_train[train],
        y_train=lookup[source.y_train[train]],
        x_test=source.x_test[test],
        y_test=lookup[source.y_test[test]],
        num_classes=len(keep),
        class_names=None if names is None else tuple(names[k] for k in keep.tolist()),
    )


def names_of(source: Source) -> tuple[str, ...]:
    """Each class's name: the source's, or for a source without names the class id as text."""
    if source.class_names is not None:
        return tuple(source.class_names)
    return tuple(str(c) for c in range(source.num_classes))


def merge(base: Source, other: Source) -> tuple[Source, tuple[int, ...]]:
    """`base` with `other`'s examples appended, `other`'s classes matched to `base`'s by name.

    A name `base` has is that class (more examples of it); a new name is a new class, appended after
    `base`'s classes in `other`'s order. Returns the merged source (train and test sets each
    `base`'s then `other`'s; named where either is) and the ids of the new classes.
    """
    if not len(other.y_train):
        raise ValueError(f"{other.name} has no training examples; there is nothing to learn.")
    shape, have = base.x_train.shape[1:], other.x_train.shape[1:]
    if shape != have or base.x_train.dtype != other.x_train.dtype:
        raise ValueError(
            f"{other.name} has examples of shape {have} ({other.x_train.dtype}), but the run's "
            f"examples have shape {shape} ({base.x_train.dtype}); bring examples of the run's "
            "shape and type."
        )
    names, theirs = names_of(base), names_of(other)
    for source, listed in ((base, names), (other, theirs)):
        repeated = sorted({n for n in listed if listed.count(n) > 1})
        if repeated:
            raise ValueError(
                f"{source.name} names several classes {repeated}; classes are matched by name, "
                "so each name must be one class's."
            )
    index = {name: c for c, name in enumerate(names)}
    new = [name for name in theirs if name not in index]
    index.update({name: base.num_classes + k for k, name in enumerate(new)})
    lookup = np.asarray([index[name] for name in theirs], np.int32)
    unnamed = base.class_names is None and other.class_names is None
    merged = base._replace(
        x_train=np.concatenate([base.x_train, other.x_train]),
        y_train=np.concatenate([base.y_train, lookup[other.y_train]]).astype(np.int32),
        x_test=np.concatenate([base.x_test, other.x_test]),
        y_test=np.concatenate([base.y_test, lookup[other.y_test]]).astype(np.int32),
        num_classes=base.num_classes + len(new),
        class_names=None if unnamed else names + tuple(new),
    )
    return merged, tuple(range(base.num_classes, merged.num_classes))
