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
