"""Sweeps: the grid, the command of each point, and a real two-point sweep that skips and resumes."""

import json
import os

import numpy as np
import pytest

from incremental import compare, sweep

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


@pytest.mark.slow  # five runs, each a process of its own
def test_a_sweep_runs_its_points_skips_finished_ones_and_resumes_unfinished_ones(
    tmp_path, monkeypatch
):
    """2 methods x 2 seeds (with the file's lr) run two at a time; a point started before (one
    phase saved) is resumed, not restarted; a second call runs nothing; the report's numbers are
    the mean and std of the points' own results.json."""
    from configs import digits
    from incremental import compare
    from incremental import run as run_lib

    config_file = tmp_path / "grid_config.py"
    config_file.write_text(CONFIG)
    workdir = str(tmp_path / "grid")
    grid = "method=[finetune,replay];seed=[0,1]"
    started = sweep.point_dir(workdir, 3, {"train.lr": "0.05", "method": "replay", "seed": "1"})
    config = digits.get_config("method=replay")
    config.train.epochs = config.train_first.epochs = 1
    config.protocol.init_classes, config.protocol.increment = 4, 3
    config.log.plot = config.log.progress = False
    config.train.lr, config.seed = 0.05, 1
    run_lib.run(config, started, stop_after=0)

    monkeypatch.chdir(ROOT)  # the points import `configs` from the repository
    said, watched = [], []
    entries = sweep.run_sweep(
        str(config_file), workdir, grid, parallel=2, say=said.append, watch=watched.append
    )
    assert watched and all(0 < len(running) <= 2 for running in watched)  # about once a second
    assert {e["point"] for running in watched for e in running} <= {0, 1, 2, 3}
    assert [e["before"] for e in entries] == ["new", "new", "new", "partial"]
    assert [e["status"] for e in entries] == ["done"] * 4
    assert [e["exit_code"] for e in entries] == [0] * 4
    with open(os.path.join(started, "results.json")) as f:
        assert len(json.load(f)["accuracy_matrix"]) == 3
    again = sweep.run_sweep(str(config_file), workdir, grid, point=0, say=said.append)
    assert again[0]["exit_code"] is None and said[-1] == "4 points; 1 done, 0 to run in " + workdir

    text, written = compare.report([workdir], str(tmp_path / "report"))
    rows = {line.split(" | ")[2]: line for line in text.splitlines()[2:]}
    assert sorted(rows) == ["finetune", "replay"]  # seeds pooled; lr and method not swept apart
    for method, first in (("finetune", 0), ("replay", 2)):
        last = [100 * entries[k]["last_accuracy"] for k in (first, first + 1)]
        assert f"{np.mean(last):.1f} ± {np.std(last):.1f}" in rows[method]
    assert len(written) == 3 and all(os.path.getsize(p) for p in written)


def test_a_running_points_line_reads_the_tail_of_its_metrics(tmp_path):
    entry = {"point": 2, "overrides": {"method": "lwf", "seed": "1"}, "workdir": str(tmp_path)}
    assert sweep.point_line(entry) == "point 2 method=lwf,seed=1: starting"
    records = [
        {"kind": "train", "phase": 0, "step": 9, "loss": 2.0, "examples_per_second": 1234.5},
        {"kind": "eval", "phase": 0, "accuracy": 0.875},
        {"kind": "train", "phase": 1, "step": 3, "loss": 0.4567},
    ]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "pha'
    (tmp_path / "metrics.jsonl").write_text("x" * 20000 + "\n" + text)  # a cut, then a torn line
    assert sweep.point_line(entry) == (
        "point 2 method=lwf,seed=1: phase 1 step 3 loss 0.457 1,234 ex/s (phase 0: 87.5%)"
    )


def _results(method, seed, lr, last, curve):
    config = {"method": method, "seed": seed, "train": {"lr": lr}, "log": {"plot": seed == 0}}
    return {
        "complete": True, "method": method, "dataset": "digits", "phase_sizes": [2, 2],
        "config": config, "last_accuracy": last, "average_incremental_accuracy": np.mean(curve),
        "forgetting": 0.1, "accuracy": curve,
        "phases": [{"train_seconds": 1.0, "compile_seconds": 0.5}] * 2,
    }  # fmt: skip


def test_the_report_groups_by_the_swept_keys_and_pools_the_seeds(tmp_path):
    runs = [
        _results("replay", 0, 0.1, 0.5, [0.9, 0.5]),
        _results("replay", 1, 0.1, 0.7, [1.0, 0.7]),
        _results("replay", 0, 0.05, 0.6, [0.9, 0.6]),
        {**_results("icarl", 0, 0.1, 0.8, [1.0, 0.8]), "nme_last_accuracy": 0.85},
        {**_results("icarl", 1, 0.1, 0.9, [1.0, 0.9]), "complete": False},  # unfinished: left out
    ]
    for i, doc in enumerate(runs):
        os.makedirs(tmp_path / f"run{i}")
        (tmp_path / f"run{i}" / "results.json").write_text(json.dumps(doc))
    text, written = compare.report([str(tmp_path)], str(tmp_path / "out" / "report"))
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert [r[2] for r in rows] == [
        "icarl",  # its one finished run: nothing swept
        "replay train.lr=0.05",
        "replay train.lr=0.1",
    ]
    assert rows[2][3:6] == ["2", "60.0 ± 10.0", "77.5 ± 7.5"]  # runs, last, average (in %)
    assert rows[0][7] == "85.0 ± 0.0" and rows[1][7] == "-"  # NME only where the method has it
    assert rows[0][9] == "2.0 ± 0.0"  # training seconds summed over phases
    assert [os.path.basename(p) for p in written] == [
        "report.md",
        "report.csv",
        "report-digits-2_2.png",
    ]
    with pytest.raises(ValueError, match="No finished run"):
        compare.report([str(tmp_path / "out")])


def test_the_report_command_prints_and_writes_or_refuses_by_name(tmp_path):
    import subprocess
    import sys

    os.makedirs(tmp_path / "runs" / "a")
    doc = _results("replay", 0, 0.1, 0.5, [0.9, 0.5])
    (tmp_path / "runs" / "a" / "results.json").write_text(json.dumps(doc))
    cmd = [sys.executable, "-m", "incremental.main", "report", str(tmp_path / "runs")]
    proc = subprocess.run(
        [*cmd, f"--out={tmp_path / 'r'}"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0 and "| digits | 2+2 | replay | 1 | 50.0 ± 0.0 |" in proc.stdout
    assert (tmp_path / "r.csv").exists()
    proc = subprocess.run(
        [*cmd[:-1], str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "is not a directory" in out and "Traceback" not in out


def test_seeds_together_make_one_point_of_a_grids_seeds(tmp_path):
    """--seeds_together: the seeds of each other combination are one point's config.seeds."""
    config_file = tmp_path / "c.py"
    config_file.write_text("def get_config(arg=None):\n    return None\n")
    found = sweep.points(str(config_file), "method=[replay,icarl];seed=[0,1,2]", True)
    assert found == [
        {"method": "replay", "seeds": "(0,1,2,)"},
        {"method": "icarl", "seeds": "(0,1,2,)"},
    ]
    assert len(sweep.points(str(config_file), "method=[replay,icarl];seed=[0,1,2]")) == 6


def test_the_report_reads_the_seeds_of_a_seeds_run_not_its_summary(tmp_path):
    for seed, last in ((0, 0.5), (1, 0.7)):
        os.makedirs(tmp_path / "point" / f"seed_{seed}")
        doc = _results("replay", seed, 0.1, last, [0.9, last])
        (tmp_path / "point" / f"seed_{seed}" / "results.json").write_text(json.dumps(doc))
    summary = {**_results("replay", 0, 0.1, 0.6, [0.9, 0.6]), "per_seed": {}}
    (tmp_path / "point" / "results.json").write_text(json.dumps(summary))
    text, _ = compare.report([str(tmp_path)])
    assert "| replay | 2 | 60.0 ± 10.0 |" in text
