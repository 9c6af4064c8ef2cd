"""Phase 0 from a classifier the user already has: evaluation equals the model's own predictions."""

import json

import jax
import numpy as np
import pytest
from flax import serialization

from configs import digits
from incremental import run as run_lib
from incremental import workdirs
from incremental.models import build_model
from incremental.phase import load


def config_of(path, epochs=0):
    config = digits.get_config("method=replay")
    config.protocol.class_order = "natural"
    config.protocol.init_classes, config.protocol.increment = 3, 2  # 3 given, then 2 + 2 + 2 + 1
    config.protocol.phase_sizes = "3,2,2,2,1"
    config.train.epochs, config.train_first.epochs = 1, epochs
    config.model.init_from = str(path)
    config.log.progress = config.log.plot = False
    return config


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """A 3-class MLP 'trained elsewhere': random weights, saved as msgpack with classes.json."""
    directory = tmp_path_factory.mktemp("given")
    model = build_model("mlp", 3, hidden=(256,))
    variables = model.init(jax.random.PRNGKey(7), np.zeros((1, 8, 8, 1)), train=False)
    path = directory / "model.msgpack"
    path.write_bytes(serialization.to_bytes({"params": variables["params"]}))
    (directory / "classes.json").write_text(json.dumps(["0", "1", "2"]))
    return path, model, variables


def test_phase_0_is_the_given_model_exactly(given, tmp_path):
    path, model, variables = given
    config = config_of(path)
    workdir = str(tmp_path / "run")
    run_lib.run(config, workdir, stop_after=0)
    rs, saved = workdirs.restore(workdir, 0)
    _, predicted = workdirs.evaluate_saved(rs, saved, predictions=True)
    data = rs.data
    x = data.x_test[data.y_test < 3]
    from incremental.data import device

    _, logits = model.apply(variables, device.normalize(x, data.norm), train=False)
    np.testing.assert_array_equal(predicted["head"], np.asarray(logits).argmax(axis=1))
    head = saved.state["params"]["head"]["kernel"]  # a head of capacity 10: the given 3 first
    np.testing.assert_array_equal(head[:, :3], variables["params"]["head"]["kernel"])
    assert not np.asarray(head[:, 3:]).any()


@pytest.mark.parametrize(
    "change, message",
    [
        (
            "hidden",
            r"params/backbone/dense0/bias has shape \(128,\), the configured model's is \(256,\)",
        ),
        ("names", r"names the head's columns \['0', '2', '1'\], but phase 0 .* \['0', '1', '2'\]"),
        ("missing", r"does not exist"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_naming_the_first_mismatch(
    given, tmp_path, change, message
):
    path, _, _ = given
    if change == "hidden":
        other = build_model("mlp", 3, hidden=(128,))
        variables = other.init(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 1)), train=False)
        path = tmp_path / "model.msgpack"
        path.write_bytes(serialization.to_bytes({"params": variables["params"]}))
    elif change == "names":
        path = tmp_path / "model.msgpack"
        path.write_bytes(given[0].read_bytes())
        (tmp_path / "classes.json").write_text(json.dumps(["0", "2", "1"]))
    else:
        path = tmp_path / "nowhere.msgpack"
    with pytest.raises(ValueError, match=message):
        load.validate(config_of(path), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_pretrained_constants_are_scaled_to_each_sources_own_range(monkeypatch):
    """A checkpoint's mean and std are of images in [0, 1]: digits store 0..16, so they are scaled
    by 16 (not by uint8's 255); uint8 images by 255, float images by 1."""
    from incremental.data import sources
    from incremental.models import vit_weights
    from incremental.phase import pretrained

    recipe = vit_weights.Recipe("test", (0.25, 0.5, 0.75), (0.5, 0.5, 0.5), "tanh")
    monkeypatch.setattr(vit_weights, "recipe", lambda path: recipe)
    config = digits.get_config()
    config.model.pretrained = "weights.npz"  # its recipe is the one above; no arrays are read
    data, _, source = load.load_data(config)
    assert source.max_value == 16 and source.x_train.max() == 16
    np.testing.assert_allclose(data.norm.mean.ravel(), [8.0])  # gray: the channels' average
    np.testing.assert_allclose(data.norm.std.ravel(), [8.0])
    rgb = np.zeros((2, 4, 4, 3), np.uint8)
    for x, max_value, scale in ((rgb, None, 255), (rgb.astype(np.float32), None, 1), (rgb, 2, 2)):
        norm = pretrained.normalizer(config, x, True, max_value)
        np.testing.assert_allclose(norm.mean.ravel(), np.multiply(recipe.mean, scale), rtol=1e-6)
        assert sources.full_intensity(x, max_value) == scale
    with pytest.raises(ValueError, match="max_value must be positive"):
        sources.full_intensity(rgb, 0)
