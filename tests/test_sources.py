"""Tests for incremental/data/sources.py."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from incremental.data import sources
from incremental.data.sources import SOURCES, Source, load_source, subset_classes

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_tensorflow():
    """Checks that the test never imports TensorFlow (which is not installed here)."""
    if "tensorflow" in sys.modules:
        pytest.skip("TensorFlow was already imported by another test.")
    yield
    assert "tensorflow" not in sys.modules


def test_digits_shapes_and_classes():
    src = load_source("digits")
    assert isinstance(src, Source)
    assert src.x_train.shape[1:] == (8, 8, 1) and src.x_test.shape[1:] == (8, 8, 1)
    assert src.x_train.dtype == np.uint8 and src.y_train.dtype == np.int32
    assert src.x_train.max() == 16  # Raw 0..16 values, not rescaled.
    assert len(src.x_train) + len(src.x_test) == 1797
    assert len(src.x_test) == 360
    assert src.num_classes == 10 and src.is_image and src.name == "digits"
    assert set(src.y_train) == set(src.y_test) == set(range(10))


def test_digits_split_is_stratified_and_fixed():
    a, b = load_source("digits", seed=0), load_source("digits", seed=123)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    test_counts = np.bincount(a.y_test, minlength=10)
    all_counts = test_counts + np.bincount(a.y_train, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1)


def test_mnist1d_features_and_determinism():
    src = load_source("mnist1d")
    assert src.x_train.shape == (4000, 40) and src.x_test.shape == (1000, 40)
    assert src.x_train.dtype == np.float32 and src.y_train.dtype == np.int32
    assert src.num_classes == 10 and not src.is_image
    assert set(src.y_train) == set(src.y_test) == set(range(10))
    src.x_train[:] = 0  # Mutating a returned array must not reach the cache.
    sources._mnist1d_arrays.cache_clear()
    np.random.seed(7)  # noqa: NPY002
    expected_draw = np.random.random()  # noqa: NPY002
    np.random.seed(7)  # noqa: NPY002
    regenerated = load_source("mnist1d")
    assert np.random.random() == expected_draw  # noqa: NPY002
    assert np.abs(regenerated.x_train).sum() > 0
    np.testing.assert_array_equal(regenerated.x_test, src.x_test)
    np.testing.assert_array_equal(regenerated.y_train, src.y_train)


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"), [("mnist", (28, 28, 1), 10), ("cifar100", (32, 32, 3), 100)]
)
def test_tfds_mock_data(no_tensorflow, name, shape, num_classes):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        src = load_source(f"tfds:{name}")
    assert src.x_train.shape == (12, *shape) and src.x_test.shape == (12, *shape)
    assert src.x_train.dtype == np.uint8
    assert src.y_train.dtype == np.int32 and src.y_train.shape == (12,)
    assert src.num_classes == num_classes and src.is_image and src.name == f"tfds:{name}"
    for y in (src.y_train, src.y_test):
        assert y.min() >= 0 and y.max() < num_classes
    assert len(np.unique(src.x_train.reshape(12, -1), axis=0)) == 12


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """A small dataset written to real array_record files (no TensorFlow needed)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(23), "test": self._generate_examples(5)}

    def _generate_examples(self, num_examples):
        for i in range(num_examples):
            yield i, {"image": np.full((4, 4, 1), i, np.uint8), "label": i % 10}


def test_tfds_reads_prepared_array_record(no_tensorflow, tmp_path, monkeypatch):
    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    monkeypatch.setattr(sources, "_TFDS_CHUNK", 5)  # Reads cross chunk boundaries.
    src = load_source("tfds:tiny_images", data_dir=str(tmp_path))
    assert src.x_train.shape == (23, 4, 4, 1) and src.x_test.shape == (5, 4, 4, 1)
    assert src.num_classes == 10
    # Preparing shuffles records; each image still carries its own label.
    order = np.argsort(src.x_train[:, 0, 0, 0])
    np.testing.assert_array_equal(src.x_train[order, 0, 0, 0], np.arange(23))
    np.testing.assert_array_equal(src.y_train[order], np.arange(23) % 10)
    # download=True reuses prepared data instead of fetching anything.
    again = load_source("tfds:tiny_images", data_dir=str(tmp_path), download=True)
    np.testing.assert_array_equal(again.x_test, src.x_test)


def test_tfds_unprepared_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"scripts/prepare_tfds.py mnist --data_dir") as info:
        load_source("tfds:mnist", data_dir=str(tmp_path))
    assert time.perf_counter() - start < 5
    assert "pip install -e '.[prepare]'" in str(info.value)


def test_tfds_unknown_dataset():
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_dataset_xyz'"):
        load_source("tfds:no_such_dataset_xyz")


def test_prepare_script_without_tensorflow_says_what_to_install():
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_tfds.py"), "mnist", "--data_dir", "/d"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "pip install -e '.[prepare]'" in result.stderr
    assert "prepare_tfds.py mnist --data_dir /d" in result.stderr


def test_prepare_without_the_network_says_so_at_once(monkeypatch, tmp_path):
    """The download hosts are tried first: an unreachable one is named within seconds (tfds alone
    retries for minutes), and nothing is downloaded or prepared."""
    sys.path.insert(0, str(REPO / "scripts"))
    import prepare_tfds

    tried = []

    def no_network(address, timeout):
        tried.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(prepare_tfds.socket, "create_connection", no_network)
    with pytest.raises(ValueError, match=r"www\.cs\.toronto\.edu, which cannot be reached") as info:
        prepare_tfds.prepare("cifar100", str(tmp_path))
    assert "Network is unreachable" in str(info.value)
    assert tried == [(("www.cs.toronto.edu", 443), 5.0)]
    assert not any(tmp_path.iterdir())  # nothing downloaded or prepared


def _save(path, **arrays):
    """Saves arrays to `path` and returns the source name that loads them."""
    np.savez(path, **arrays)
    return f"npz:{path}"


def _valid_arrays(x_shape=(6, 5), dtype=np.float64):
    """A small valid train/test set of features or images."""
    rng = np.random.default_rng(0)
    x = (rng.random(x_shape) * 255).astype(dtype)
    y = np.array([0, 1, 2, 0, 1, 3])
    test = [0, 1, 2, 5]  # every class in both splits
    return {"x_train": x, "y_train": y, "x_test": x[test], "y_test": y[test]}


def test_npz_round_trip_images(tmp_path):
    arrays = _valid_arrays((6, 3, 3, 2), np.uint8)
    src = load_source(_save(tmp_path / "imgs.npz", **arrays))
    assert src.is_image and src.num_classes == 4 and src.x_train.dtype == np.uint8
    for key in sources.NPZ_KEYS:
        np.testing.assert_array_equal(getattr(src, key), arrays[key])
    assert src.y_train.dtype == np.int32


def test_npz_round_trip_features_and_channel_axis(tmp_path):
    arrays = _valid_arrays((6, 5))
    arrays["y_train"] = arrays["y_train"].astype(np.float64)  # Integral floats are accepted.
    src = load_source(_save(tmp_path / "feats.npz", **arrays))
    assert not src.is_image and src.x_train.dtype == np.float32
    np.testing.assert_allclose(src.x_train, arrays["x_train"], rtol=1e-6)
    np.testing.assert_array_equal(src.y_train, arrays["y_train"])
    gray = load_source(_save(tmp_path / "gray.npz", **_valid_arrays((6, 3, 3), np.uint8)))
    assert gray.is_image and gray.x_train.shape == (6, 3, 3, 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"y_test": None}, r"missing arrays \['y_test'\].*required"),
        ({"y_train": np.zeros(5, int)}, "x_train has 6 examples but y_train has 5"),
        ({"y_train": np.array([0, 1.5, 2, 0, 1, 3])}, "integer class ids"),
        ({"y_train": np.array(["a"] * 6)}, "integer class ids"),
        ({"y_test": np.array([0, -1, 2, 0])}, "negative class ids"),
        ({"x_train": np.full((6, 5), np.nan)}, "NaN or infinite"),
        ({"x_test": np.zeros((4, 7))}, r"shape \(5,\) but x_test examples have shape \(7,\)"),
        ({"x_train": np.zeros(6)}, r"expected \(N, D\) features"),
    ],
)
def test_npz_errors(tmp_path, change, match):
    arrays = {**_valid_arrays(), **change}
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with pytest.raises(ValueError, match=match):
        load_source(_save(tmp_path / "bad.npz", **arrays))


def test_npz_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_source(f"npz:{tmp_path / 'nope.npz'}")


@pytest.mark.parametrize("name", ["cifar", "tfds:", "npz:", ""])
def test_unknown_source_lists_valid_names(name):
    with pytest.raises(ValueError, match="valid sources are") as info:
        load_source(name)
    assert all(valid in str(info.value) for valid in SOURCES)


def test_subset_classes_keeps_and_relabels():
    full = load_source("digits")
    sub = subset_classes(full, "7,2")
    assert sub.num_classes == 2
    assert set(np.unique(sub.y_train)) == {0, 1}
    np.testing.assert_array_equal(sub.x_train[sub.y_train == 0], full.x_train[full.y_train == 7])
    seeded = subset_classes(full, "seeded:4")
    expected = np.random.RandomState(1993).permutation(10)[:4]  # noqa: NPY002
    assert len(seeded.y_test) == sum(int((full.y_test == c).sum()) for c in expected)
    for spec, message in [("seeded:11", "11 of 10"), ("1,1", "distinct"), ("a", "seeded:K")]:
        with pytest.raises(ValueError, match=message):
            subset_classes(full, spec)


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 truncated", b"not a zip at all"])
def test_a_damaged_cache_file_is_built_again_and_replaced(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("INCREMENTAL_CACHE", str(tmp_path))
    built = []

    def build():
        built.append(1)
        return (np.arange(3), np.ones((2, 2)))

    first = sources._disk_cached("thing", "1", build)
    path = tmp_path / "thing-1.npz"
    path.write_bytes(damage)
    again = sources._disk_cached("thing", "1", build)
    assert len(built) == 2 and all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert sources._disk_cached("thing", "1", build)[0].tolist() == [0, 1, 2] and len(built) == 2


def test_tfds_images_of_varying_sizes_need_and_get_one_square_size(no_tensorflow):
    # caltech_birds2011's images have varying sizes (the mock's too): refused without a size,
    # read with dataset.image_size as squares.
    def mock():
        return tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE)

    with mock(), pytest.raises(ValueError, match="varying sizes; set dataset.image_size"):
        load_source("tfds:caltech_birds2011")
    with mock():
        src = load_source("tfds:caltech_birds2011", image_size=12)
    assert src.x_train.shape == src.x_test.shape == (6, 12, 12, 3) and src.num_classes == 200
    assert src.x_train.dtype == np.uint8 and src.is_image


def test_square_image_keeps_the_central_square_of_the_shorter_side():
    # 20 x 40, left half 0 and right half 200: the central 20 x 20 at 10 px is half of each.
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 200
    out = sources.square_image(image, 10)
    assert out.shape == (10, 10, 3)
    # Bicubic rings by a few levels next to the edge.
    assert (out[:, :4] <= 3).all() and (np.abs(out[:, 6:].astype(int) - 200) <= 3).all()
    gray = sources.square_image(np.full((30, 20, 1), 7, np.uint8), 5)
    assert gray.shape == (5, 5, 1) and (gray == 7).all()


def test_a_test_only_tfds_dataset_is_split_per_class_and_relabelled(no_tensorflow):
    """imagenet_r (200 ImageNet ids, a test split only): 20% of each class held out (seed 0), the
    ids present renumbered 0..K-1 in their order."""
    ids = np.repeat([7, 100, 513, 998], 10)  # 4 classes of 10 examples, of varying sizes

    def data_source(builder, split, **kwargs):
        assert split == ["test"], split
        examples = [
            {"image": np.full((8 + i % 5, 9 + i % 3, 3), i, np.uint8), "label": label}
            for i, label in enumerate(ids)
        ]
        return [Examples(examples, builder.info)]

    with tfds.testing.mock_data(as_data_source_fn=data_source):
        src = load_source("tfds:imagenet_r", image_size=8)
        again = load_source("tfds:imagenet_r", image_size=8)
    assert src.num_classes == 4 and src.x_train.shape == (32, 8, 8, 3)
    np.testing.assert_array_equal(np.bincount(src.y_test), [2, 2, 2, 2])
    np.testing.assert_array_equal(np.bincount(src.y_train), [8, 8, 8, 8])
    # Each image once, in one split (its value is its index); the same split every time.
    seen = np.concatenate([src.x_train[:, 0, 0, 0], src.x_test[:, 0, 0, 0]])
    np.testing.assert_array_equal(np.sort(seen), np.arange(40))
    np.testing.assert_array_equal(
        ids[src.x_test[:, 0, 0, 0]], np.array([7, 100, 513, 998])[src.y_test]
    )
    np.testing.assert_array_equal(again.x_test, src.x_test)


class Examples(list):
    """A list of examples with the `dataset_info` a TFDS data source has."""

    def __init__(self, examples, info):
        super().__init__(examples)
        self.dataset_info = info
