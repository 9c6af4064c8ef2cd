"""Sweeps: the grid, the command of each point, and a real two-point sweep that skips and resumes."""

import json
import os

import pytest

from incremental import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_grid_is_the_product_of_the_lists_last_key_fastest():
    assert sweep.parse_grid("method=[replay,icarl];seed=[0,1]") == [
        {"method": "replay", "seed": "0"},
        {"method": "replay", "seed": "1"},
        {"method": "icarl", "seed": "0"},
        {"method": "icarl", "seed": "1"},
    ]
    for bad in ("method=replay", "seed=[]", "seed=[0];seed=[1]"):
        with pytest.raises(ValueError, match="--sweep"):
            sweep.parse_grid(bad)


def test_the_method_goes_into_the_config_files_argument():
    cmd = sweep.command("configs/digits.py:method=lwf", {"method": "icarl", "seed": "2"}, "d")
    assert cmd[3:] == ["run", "--config=configs/digits.py:method=icarl", "--config.seed=2",
                       "--workdir=d", "--config.log.progress=False"]  # fmt: skip


CONFIG = """
from configs import digits

def get_config(arg=None):
    config = digits.get_config(arg)
    config.train.epochs = config.train_first.epochs = 1
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.plot = False
    return config

def get_sweep():
    return [{"train.lr": 0.05}]
"""


def test_a_sweep_runs_its_points_skips_finished_ones_and_resumes_unfinished_ones(
    tmp_path, monkeypatch
):
    """Two points (the file's lr with the grid's two methods) run two at a time; a point started
    before (one phase saved) is resumed, not restarted; a second call runs nothing."""
    from configs import digits
    from incremental import run as run_lib

    config_file = tmp_path / "grid_config.py"
    config_file.write_text(CONFIG)
    workdir = str(tmp_path / "grid")
    started = sweep.point_dir(workdir, 1, {"train.lr": "0.05", "method": "replay"})
    config = digits.get_config("method=replay")
    config.train.epochs = config.train_first.epochs = 1
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.plot = config.log.progress = False
    config.train.lr = 0.05
    run_lib.run(config, started, stop_after=0)

    monkeypatch.chdir(ROOT)  # the points import `configs` from the repository
    said = []
    entries = sweep.run_sweep(str(config_file), workdir, "method=[finetune,replay]", parallel=2,
                              say=said.append)  # fmt: skip
    assert [e["before"] for e in entries] == ["new", "partial"]
    assert [e["status"] for e in entries] == ["done", "done"]
    assert [e["exit_code"] for e in entries] == [0, 0]
    assert all(0 < e["last_accuracy"] <= 1 for e in entries)
    with open(os.path.join(started, "results.json")) as f:
        assert len(json.load(f)["accuracy_matrix"]) == 3
    with open(os.path.join(workdir, sweep.SWEEP_FILE)) as f:
        assert [e["overrides"]["method"] for e in json.load(f)] == ["finetune", "replay"]
    again = sweep.run_sweep(str(config_file), workdir, "method=[finetune,replay]", point=0,
                            say=said.append)  # fmt: skip
    assert again[0]["exit_code"] is None and said[-1] == "2 points; 1 done, 0 to run in " + workdir
