"""The command line, run as a user runs it: a subprocess."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def incremental(*args, cwd=ROOT):
    cmd = [sys.executable, "-m", "incremental.main", "run", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_run_with_a_tiny_override_writes_results_and_plot(tmp_path):
    workdir = tmp_path / "run"
    proc = incremental(
        "--config=configs/digits.py:method=joint",
        "--config.train.epochs=2",
        "--config.train_first.epochs=2",
        f"--workdir={workdir}",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert results["method"] == "joint" and results["complete"]
    assert results["config"]["train"]["epochs"] == 2
    assert (workdir / "accuracy.png").stat().st_size > 1000
    assert "last accuracy" in proc.stdout and "phase 4" in proc.stdout
    # Re-running the same command finds every phase done and trains nothing.
    again = incremental(
        "--config=configs/digits.py:method=joint",
        "--config.train.epochs=2",
        "--config.train_first.epochs=2",
        f"--workdir={workdir}",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming after phase 4" in again.stdout


def test_unknown_method_fails_fast_with_the_valid_names(tmp_path):
    start = time.perf_counter()
    proc = incremental("--config=configs/digits.py:method=icarll", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "Unknown method 'icarll'" in output and "finetune" in output
    assert time.perf_counter() - start < 60


def test_bad_config_arg_and_missing_config_file_are_reported(tmp_path):
    proc = incremental("--config=configs/digits.py:methd=joint")
    assert proc.returncode != 0 and "methd=joint" in proc.stderr + proc.stdout
    proc = incremental("--config=configs/nope.py")
    assert proc.returncode != 0 and "nope.py" in proc.stderr + proc.stdout


def command(*args):
    cmd = [sys.executable, "-m", "incremental.main", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_help_lists_the_verbs_and_each_verbs_flags():
    for args in ((), ("--help",), ("-h",)):
        proc = command(*args)
        assert proc.returncode == 0, (args, proc.stderr[-1000:])
        assert all(f"  {verb} " in proc.stdout for verb in ("run", "evaluate", "surgery"))
    proc = command("run", "--help")
    assert proc.returncode == 0 and "--config.KEY=VALUE" in proc.stdout
    assert "--allow_data_change" in proc.stdout
    for verb in ("evaluate", "surgery", "benchmark"):
        proc = command(verb, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith("usage: "), verb
    proc = command("trian")
    assert proc.returncode == 2 and "unknown command 'trian'" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
