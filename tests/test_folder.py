"""Tests for image folders as a data source (incremental/data/folder.py, `folder:PATH`)."""

import os
import re
import warnings

import numpy as np
import pytest
from PIL import Image

from incremental.data import folder, sources
from incremental.data.sources import load_folder, load_source, subset_classes


def _rng(seed=0):
    return np.random.default_rng(seed)


def _save(root, path, image, **params):
    """Saves the PIL `image` at root/path (directories made); returns its expected RGB array."""
    full = os.path.join(root, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    image.save(full, **params)
    return np.asarray(image.convert("RGB"))


def _palette_image(rng, shape):
    """A "P" image and its RGB pixels computed from the palette by hand."""
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(index)
    image.putpalette(palette.tobytes())
    assert image.mode == "P"
    return image, palette[index]


def _mixed_images(rng, shape=(6, 5)):
    """(file name, image, expected RGB, save parameters) in several modes and lossless formats."""
    gray = rng.integers(0, 256, shape, dtype=np.uint8)
    rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    palette, palette_rgb = _palette_image(rng, shape)
    return [
        ("a_gray.png", Image.fromarray(gray), np.repeat(gray[..., None], 3, axis=2), {}),
        ("b_rgb.webp", Image.fromarray(rgb), rgb, {"lossless": True}),
        # .convert("RGB") drops the alpha channel; no compositing over a background.
        ("c_rgba.png", Image.fromarray(rgba), rgba[..., :3], {}),
        ("d_palette.bmp", palette, palette_rgb, {}),
        ("E_GRAY.BMP", Image.fromarray(gray[::-1]), np.repeat(gray[::-1, :, None], 3, axis=2), {}),
        ("f_palette.gif", palette, palette_rgb, {}),
    ]


def _write_split_folder(root, classes=("dog", "ant", "cat"), seed=0):
    """train/ and test/ of mixed images; returns {split: (x, y)} in the order load_source gives."""
    rng = _rng(seed)
    expected = {}
    for split in ("train", "test"):
        rows = []
        for name in classes:
            for filename, image, pixels, params in _mixed_images(rng):
                path = os.path.join(split, name, filename)
                converted = _save(root, path, image, **params)
                np.testing.assert_array_equal(converted, pixels)  # the expectation is right
                rows.append((path, sorted(classes).index(name), pixels))
        rows.sort(key=lambda r: (r[1], r[0]))
        expected[split] = (np.stack([r[2] for r in rows]), np.array([r[1] for r in rows]))
    return expected


def test_a_split_folder_round_trips_in_every_mode_and_format(tmp_path):
    expected = _write_split_folder(tmp_path)
    # Not images, hidden, or in a hidden directory: left out.
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"junk")
    _save(tmp_path, "train/cat/.thumbs/x.png", Image.new("RGB", (6, 5)))
    with pytest.warns(UserWarning, match=r"ignored 1 files that are not images.*notes\.txt"):
        src = load_source(f"folder:{tmp_path}")
    assert src.class_names == ("ant", "cat", "dog") and src.num_classes == 3
    assert src.is_image and src.name == f"folder:{tmp_path}"
    for split in ("train", "test"):
        x, y = getattr(src, f"x_{split}"), getattr(src, f"y_{split}")
        assert x.dtype == np.uint8 and y.dtype == np.int32
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda a: Image.fromarray(a[..., 0])),
        ("LA", lambda a: Image.frombytes("LA", (5, 6), a[..., :2].tobytes())),
        ("RGBA", lambda a: Image.fromarray(a)),
        ("CMYK", lambda a: Image.frombytes("CMYK", (5, 6), a.tobytes())),
        ("I;16", lambda a: Image.fromarray(a[..., 0].astype(np.uint16))),
    ],
)
def test_every_mode_becomes_rgb(tmp_path, mode, make):
    image = make(_rng().integers(0, 256, (6, 5, 4), dtype=np.uint8))
    assert image.mode == mode
    path = str(tmp_path / "image.tif")
    image.save(path)
    decoded = folder.decode_image(path, 0)
    assert decoded.shape == (6, 5, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, np.asarray(image.convert("RGB")))


def test_jpeg_is_close(tmp_path):
    smooth = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    for split in ("train", "test"):
        _save(tmp_path, f"{split}/a/x.jpg", Image.fromarray(smooth), quality=95)
    src = load_source(f"folder:{tmp_path}")
    assert src.x_train.shape == (1, 16, 16, 3)
    assert np.abs(src.x_train[0].astype(int) - smooth).mean() < 8


def test_images_of_other_sizes_are_resized_bilinearly(tmp_path):
    rng = _rng()
    arrays = {
        "train/a/0.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
        "train/a/1.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),  # kept as it is
        "train/b/0.png": rng.integers(0, 256, (13, 9, 3), dtype=np.uint8),
        "test/a/0.png": rng.integers(0, 256, (31, 2, 3), dtype=np.uint8),
        "test/b/0.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
    }
    for path, array in arrays.items():
        _save(tmp_path, path, Image.fromarray(array))
    src = load_source(f"folder:{tmp_path}", image_size=8)
    assert src.x_train.shape == (3, 8, 8, 3) and src.x_test.shape == (2, 8, 8, 3)
    resized = {
        path: np.asarray(Image.fromarray(a).resize((8, 8), Image.Resampling.BILINEAR))
        for path, a in arrays.items()
    }
    np.testing.assert_array_equal(resized["train/a/1.png"], arrays["train/a/1.png"])
    train = [resized[p] for p in ("train/a/0.png", "train/a/1.png", "train/b/0.png")]
    np.testing.assert_array_equal(src.x_train, np.stack(train))
    np.testing.assert_array_equal(
        src.x_test, np.stack([resized["test/a/0.png"], arrays["test/b/0.png"]])
    )


def _write_numbered(root, sizes, order=1):
    """Class c gets sizes[c] 2x2 images, each filled with its own number (its id); `order`
    reverses the order in which the files are created."""
    files, number = [], 0
    for name, count in sizes.items():
        for i in range(count):
            files.append((f"{name}/img{i:02d}.png", number))
            number += 1
    for path, value in files[::order]:
        _save(root, path, Image.fromarray(np.full((2, 2), value, np.uint8)))


def _ids(x):
    return sorted(x[:, 0, 0, 0].tolist())


# Test images of classes a, b, c (5, 2 and 10 images): round(holdout * n), at least 1, at most n - 1.
@pytest.mark.parametrize("holdout, tests", [(0.2, [1, 1, 2]), (0.5, [3, 1, 5]), (0.9, [4, 1, 9])])
def test_the_held_out_split_is_stratified_and_reproducible(tmp_path, holdout, tests):
    sizes = {"c": 10, "a": 5, "b": 2}
    _write_numbered(tmp_path / "one", sizes)
    _write_numbered(tmp_path / "two", sizes, order=-1)  # created in the other order
    one = load_folder(str(tmp_path / "one"), image_size=0, holdout=holdout)
    assert one.class_names == ("a", "b", "c")
    assert [int((one.y_test == k).sum()) for k in range(3)] == tests
    assert [int((one.y_train == k).sum()) for k in range(3)] == [
        5 - tests[0],
        2 - tests[1],
        10 - tests[2],
    ]
    assert sorted(_ids(one.x_train) + _ids(one.x_test)) == list(range(17))
    two = load_folder(str(tmp_path / "two"), image_size=0, holdout=holdout)
    assert _ids(two.x_test) == _ids(one.x_test)
    other = load_folder(str(tmp_path / "one"), image_size=0, holdout=holdout, seed=1)
    assert _ids(other.x_test) != _ids(one.x_test)


def test_adding_files_to_one_class_leaves_the_other_classes_split_alone(tmp_path):
    _write_numbered(tmp_path, {"a": 20, "b": 20})
    before = load_folder(str(tmp_path), image_size=0)
    _save(tmp_path, "b/img99.png", Image.fromarray(np.full((2, 2), 200, np.uint8)))
    after = load_folder(str(tmp_path), image_size=0)
    assert _ids(before.x_test[before.y_test == 0]) == _ids(after.x_test[after.y_test == 0])


def test_a_corrupt_file_is_named_or_skipped(tmp_path):
    for path in ("train/a/0.png", "train/a/1.png", "test/a/0.png", "train/b/0.png", "test/b/0.png"):
        _save(tmp_path, path, Image.new("L", (2, 2)))
    bad = tmp_path / "train" / "a" / "bad.png"
    bad.write_bytes(_rng().integers(0, 256, 100, dtype=np.uint8).tobytes())
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(bad))}.*cannot be decoded.*skip_bad_files"
    ):
        load_folder(str(tmp_path), image_size=0)
    with pytest.warns(UserWarning, match=r"skipped 1 files that cannot be decoded.*a/bad\.png"):
        src = load_folder(str(tmp_path), image_size=0, skip_bad=True)
    assert src.y_train.tolist() == [0, 0, 1] and src.y_test.tolist() == [0, 1]
    with pytest.warns(UserWarning, match="skipped 1 files"):  # read from the cache: warned again
        load_folder(str(tmp_path), image_size=0, skip_bad=True)


def test_skipping_every_test_image_of_a_class_is_refused(tmp_path):
    _save(tmp_path, "train/a/0.png", Image.new("L", (2, 2)))
    _save(tmp_path, "train/b/0.png", Image.new("L", (2, 2)))
    _save(tmp_path, "test/a/0.png", Image.new("L", (2, 2)))
    (tmp_path / "test" / "b").mkdir()
    (tmp_path / "test" / "b" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="after skipping 1 files .*test lacks 'b'"):
        load_folder(str(tmp_path), image_size=0, skip_bad=True)


def _layout(root, paths):
    for path in paths:
        if path.endswith("/"):
            os.makedirs(root / path, exist_ok=True)
        elif path.endswith(".png"):
            _save(root, path, Image.new("RGB", (4 if "wide" in path else 3, 3)))
        else:
            os.makedirs(os.path.dirname(root / path), exist_ok=True)
            (root / path).write_text("x")


@pytest.mark.parametrize(
    ("paths", "match"),
    [
        ([], "does not exist"),
        (["readme.txt"], "has no class sub-directories"),
        (["a/0.png", "a/1.png", "b/readme.txt"], r"class directory 'b' holds no images"),
        (["a/0.png", "a/1.png", "b/0.png"], r"class 'b' \(.*/b\) has 1 image; .* at least 2"),
        (["train/a/0.png", "test/b/0.png"], r"test/ lacks 'a'; train/ lacks 'b'"),
        (["train/a/0.png", "a/0.png"], "has a train/ directory but no test/"),
        (
            ["a/0.png", "a/1.png", "b/0.png", "b/1_wide.png"],
            r"differ in size, a/[01]\.png is 3x3 .* but b/1_wide\.png is 4x3.*dataset\.image_size",
        ),
    ],
)
def test_bad_folders_are_refused_with_what_to_fix(tmp_path, paths, match):
    _layout(tmp_path, paths)
    path = tmp_path if paths else tmp_path / "missing"
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_source(f"folder:{path}")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"holdout": 1.0}, ValueError),
        ({"image_size": -1}, ValueError),
        ({"image_size": 2.5}, TypeError),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        load_folder(str(tmp_path), **{"image_size": 0, **kwargs})


def _cache_files(path):
    name = folder.cache_name(str(path), image_size=0, holdout=0.2, seed=0, skip_bad=False)
    return [f for f in os.listdir(sources.cache_root()) if f.startswith(f"{name}-")]


def test_the_cache_is_read_and_rebuilt_when_the_folder_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("INCREMENTAL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    _write_numbered(root, {"a": 3, "b": 3})
    decoded = []
    real = folder.decode_image
    monkeypatch.setattr(folder, "decode_image", lambda *a: decoded.append(a[0]) or real(*a))
    first = load_folder(str(root), image_size=0)
    assert len(decoded) == 6 and len(_cache_files(root)) == 1

    def fail(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "decode_image", fail)
    again = load_folder(str(root), image_size=0)
    np.testing.assert_array_equal(again.x_train, first.x_train)
    assert again.class_names == first.class_names == ("a", "b")
    stat = os.stat(root / "a" / "img00.png")
    os.utime(root / "a" / "img00.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_folder(str(root), image_size=0)  # touched: decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_folder(str(root), image_size=4)  # other arguments: decoded again
    monkeypatch.setattr(folder, "decode_image", real)
    _save(root, "b/img99.png", Image.fromarray(np.full((2, 2), 99, np.uint8)))
    added = load_folder(str(root), image_size=0)
    assert len(added.y_train) + len(added.y_test) == 7
    assert len(_cache_files(root)) == 1  # the older version's cache file is removed


def test_npz_class_names_round_trip_and_follow_subset_classes(tmp_path):
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    x = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    names = np.array(["zero", "one", "two", "three"])
    path = tmp_path / "named.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y, class_names=names)
    src = load_source(f"npz:{path}")
    assert src.class_names == ("zero", "one", "two", "three")
    sub = subset_classes(src, "3,1")
    assert sub.class_names == ("three", "one")
    np.testing.assert_array_equal(sub.x_train[sub.y_train == 0], x[y == 3])
    seeded = subset_classes(src, "seeded:3")
    keep = np.random.RandomState(1993).permutation(4)[:3]  # noqa: NPY002
    assert seeded.class_names == tuple(names[keep])
    assert subset_classes(src._replace(class_names=None), "3,1").class_names is None


def test_npz_class_names_follow_remapped_ids_and_a_wrong_length_is_refused(tmp_path):
    y = np.array([9, 2, 5, 9, 2, 5])
    x = np.zeros((6, 2), np.float32)
    arrays = {"x_train": x, "y_train": y, "x_test": x, "y_test": y}
    np.savez(tmp_path / "remap.npz", **arrays, class_names=np.array(["two", "five", "nine"]))
    src = load_source(f"npz:{tmp_path / 'remap.npz'}", remap_labels=True)
    assert src.class_names == ("two", "five", "nine") and src.y_train[0] == 2
    np.savez(tmp_path / "short.npz", **arrays, class_names=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="class_names has 2 names but the labels have 3 classes"):
        load_source(f"npz:{tmp_path / 'short.npz'}", remap_labels=True)
    np.savez(tmp_path / "ints.npz", **arrays, class_names=np.arange(3))
    with pytest.raises(ValueError, match="one string per class"):
        load_source(f"npz:{tmp_path / 'ints.npz'}", remap_labels=True)


def test_load_data_reads_a_folder_with_the_digits_config(tmp_path):
    from configs.digits import get_config
    from incremental import schema
    from incremental.phase.load import load_data

    rng = _rng()
    for name in ("d", "c", "b", "a"):
        for i in range(5):
            size = (int(rng.integers(6, 12)), int(rng.integers(6, 12)))
            _save(
                tmp_path,
                f"{name}/{i}.png",
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)),
            )
    config = get_config()
    config.dataset.name, config.dataset.image_size = f"folder:{tmp_path}", 8
    config.model.name = "convnet"
    schema.check(config)
    data, protocol, source = load_data(config)
    assert source.class_names == ("a", "b", "c", "d") and protocol.num_classes == 4
    assert (
        data.is_image and data.x_train.shape == (16, 8, 8, 3) and data.x_test.shape == (4, 8, 8, 3)
    )
    assert sorted(np.unique(data.y_train).tolist()) == [0, 1, 2, 3]


def _digits_folder(root, names=("zero", "one", "two", "three")):
    """The first four digits classes of scikit-learn's data as PNG files, a directory per name."""
    digits = load_source("digits")
    for split, x, y in (("train", digits.x_train, digits.y_train), ("test", digits.x_test, digits.y_test)):  # fmt: skip
        for k, name in enumerate(names):
            os.makedirs(root / split / name, exist_ok=True)
            for i in np.flatnonzero(y == k)[:30]:
                Image.fromarray(x[i, :, :, 0]).save(root / split / name / f"{i}.png")
    return root


def test_class_names_reach_results_evaluation_plot_and_checkpoint(tmp_path):
    """A folder's class names: in results.json (indexed by class id), in each evaluated class, in
    the plot's legend and in the checkpoint's meta; renaming a class is a change of data that a
    resume refuses."""
    from configs import digits
    from incremental import checkpoint, report, workdirs
    from incremental import run as run_lib

    root = _digits_folder(tmp_path / "images")
    config = digits.get_config()
    config.dataset.name = f"folder:{root}"
    config.train.epochs = config.train_first.epochs = 1
    config.log.progress = config.log.plot = False
    workdir = str(tmp_path / "run")
    results = run_lib.run(config, workdir)
    names = ["one", "three", "two", "zero"]  # sorted directory names are the ids
    assert results["class_names"] == names
    doc = workdirs.evaluate(workdir)
    assert [e["name"] for e in doc["per_class"]] == [names[c] for c in results["class_order"]]
    first = results["class_order"][:2]
    assert report.phase_label(results, 0) == f"phase 0: {names[first[0]]}, {names[first[1]]}"
    ckpts = checkpoint.Checkpoints(workdir)
    assert ckpts.read_meta(1)["class_names"] == names
    ckpts.close()
    for split in ("train", "test"):  # the same images and ids, one name changed
        os.rename(root / split / "two", root / split / "twos")
    with pytest.raises(ValueError, match="fingerprint"):
        run_lib.run(config, workdir)
