"""Hyper-parameter selection on a validation split: the split, the choice and a selecting sweep."""

import json
import os

import numpy as np
import pytest

from configs import digits
from incremental import compare, sweep
from incremental.data import sources
from incremental.phase import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_validation_split_holds_out_a_fraction_of_each_class_and_replaces_the_test_set():
    source = sources.load_source("digits")
    split = sources.validation_split(source, 0.2)
    counts = np.bincount(source.y_train)
    assert np.array_equal(np.bincount(split.y_test), np.round(0.2 * counts).astype(int))
    assert len(split.y_train) + len(split.y_test) == len(source.y_train)
    rows = {r.tobytes(): y for r, y in zip(source.x_train, source.y_train, strict=True)}
    for x, y in ((split.x_train, split.y_train), (split.x_test, split.y_test)):
        assert all(rows[r.tobytes()] == label for r, label in zip(x, y, strict=True))
    held = {r.tobytes() for r in split.x_test}
    assert not held & {r.tobytes() for r in split.x_train}  # digits has no duplicate rows
    again = sources.validation_split(source, 0.2)
    assert np.array_equal(again.x_test, split.x_test)  # the same split for every point of a sweep
    other = sources.validation_split(source, 0.2, seed=1)
    assert not np.array_equal(other.x_test, split.x_test)


def test_a_run_with_a_validation_split_never_loads_the_test_set_into_its_evaluation():
    config = digits.get_config("method=finetune")
    config.dataset.validation = 0.25
    data, _, _ = load.load_data(config)
    test_rows = {r.tobytes() for r in sources.load_source("digits").x_test}
    assert not {r.tobytes() for r in data.x_test} & test_rows
    assert abs(len(data.y_test) / (len(data.y_test) + len(data.y_train)) - 0.25) < 0.01


def _finished(workdir, accuracy):
    os.makedirs(workdir)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"complete": True, "average_incremental_accuracy": accuracy}, f)


def test_the_choice_is_per_combination_of_the_other_keys_with_seeds_pooled(tmp_path):
    grid = sweep.parse_grid("method=[lwf,ewc];train.lr=[0.1,0.01];seed=[0,1]")
    scores = {  # (method, lr): per seed; lwf prefers 0.01 on the mean though seed 0 says 0.1
        ("lwf", "0.1"): (0.80, 0.50), ("lwf", "0.01"): (0.70, 0.70),
        ("ewc", "0.1"): (0.60, 0.60), ("ewc", "0.01"): (0.60, 0.60),
    }  # fmt: skip
    entries = []
    for k, o in enumerate(grid):
        workdir = str(tmp_path / f"{k}")
        _finished(workdir, scores[o["method"], o["train.lr"]][int(o["seed"])])
        entries.append(
            {"point": k, "overrides": {**o, "dataset.validation": "0.1"}, "workdir": workdir}
        )
    choice = sweep.choose(entries, ["train.lr"], "average_incremental_accuracy")
    assert [c["group"] for c in choice] == [{"method": "lwf"}, {"method": "ewc"}]
    assert [c["chosen"] for c in choice] == [
        {"train.lr": "0.01"},
        {"train.lr": "0.1"},
    ]  # tie: first
    assert [c["points"] for c in choice] == [[2, 3], [4, 5]]
    lwf = {
        c["values"]["train.lr"]: c["average_incremental_accuracy"] for c in choice[0]["candidates"]
    }
    assert lwf == pytest.approx({"0.1": 0.65, "0.01": 0.70})
    os.remove(os.path.join(entries[0]["workdir"], "results.json"))
    with pytest.raises(ValueError, match="points \\[0, 1\\]"):
        sweep.choose(entries, ["train.lr"], "average_incremental_accuracy")


def test_a_selection_needs_swept_keys_and_a_whole_sweep():
    found = sweep.parse_grid("method=[lwf];train.lr=[0.1,0.01]")
    with pytest.raises(ValueError, match="method not swept"):
        sweep.check_selection(found, ["method"], 0.1, None)
    with pytest.raises(ValueError, match="cannot run one --point"):
        sweep.check_selection(found, ["train.lr"], 0.1, 0)
    with pytest.raises(ValueError, match="--validation"):
        sweep.check_selection(found, ["train.lr"], 1.5, None)


CONFIG = """
from configs import digits

def get_config(arg=None):
    config = digits.get_config(arg)
    config.train.epochs = config.train_first.epochs = 1
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.plot = False
    return config
"""


@pytest.mark.slow  # three runs, each a process of its own
def test_a_selecting_sweep_chooses_on_validation_then_runs_the_choice_on_the_test_set(
    tmp_path, monkeypatch
):
    config_file = tmp_path / "select_config.py"
    config_file.write_text(CONFIG)
    workdir = str(tmp_path / "grid")
    monkeypatch.chdir(ROOT)
    grid = "method=[finetune];train_first.lr=[0.1,0.000001]"  # phase 0 learns nothing with 1e-6
    said = []
    entries = sweep.run_sweep(
        str(config_file), workdir, grid, parallel=2, say=said.append, select=["train_first.lr"]
    )
    with open(os.path.join(workdir, sweep.SELECTION_FILE)) as f:
        (choice,) = json.load(f)
    assert choice["chosen"] == {"train_first.lr": "0.1"} and choice["points"] == [0]
    assert [e["selected"] for e in entries] == [True, False]
    assert [e["status"] for e in entries] == ["done", "new"]
    for k in (0, 1):  # every candidate ran on the validation split
        held = sweep.point_dir(os.path.join(workdir, "validation"), k, entries[k]["overrides"])
        with open(os.path.join(held, "results.json")) as f:
            doc = json.load(f)
        assert doc["evaluated_on"] == "validation" and doc["config"]["dataset"]["validation"] == 0.1
        score = [c for c in choice["candidates"] if c["points"] == [k]][0]
        assert score["average_incremental_accuracy"] == doc["average_incremental_accuracy"]
    with open(os.path.join(entries[0]["workdir"], "results.json")) as f:
        assert json.load(f)["evaluated_on"] == "test"
    text, _ = compare.report([workdir])
    assert "digits (validation)" in text and "| digits |" in text
