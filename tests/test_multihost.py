"""Two local processes joined by jax.distributed give one process's results; one results file."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes, each compiling its own programs

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, sys
sys.path.insert(0, ".")
from configs import digits
from incremental import run as run_lib
process_id, num_processes, port, workdir, stop_after = sys.argv[1:6]
config = digits.get_config("method=replay")
config.train.epochs = config.train_first.epochs = 3
config.protocol.init_classes, config.protocol.increment = 4, 3
config.log.progress = config.log.plot = False
if int(num_processes) > 1:
    config.parallel.coordinator = f"127.0.0.1:{port}"
    config.parallel.num_processes, config.parallel.process_id = int(num_processes), int(process_id)
results = run_lib.run(config, workdir, stop_after=int(stop_after) if stop_after else None)
import jax
print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                  "matrix": results["accuracy_matrix"], "nme": results["nme_accuracy_matrix"]}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(process_id, num_processes, port, workdir, stop_after=None):
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = {**os.environ, "XLA_FLAGS": " ".join(flags)}  # one CPU device each
    stop = "" if stop_after is None else str(stop_after)
    args = [str(process_id), str(num_processes), str(port), str(workdir), stop]
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_two_processes_give_one_process_results(tmp_path):
    port = free_port()
    procs = [launch(i, 2, port, tmp_path / "two") for i in range(2)]
    single = result(launch(0, 1, 0, tmp_path / "one"))
    both = [result(p) for p in procs]
    assert [b["processes"] for b in both] == [2, 2] and both[0]["devices"] == 2
    assert single["processes"] == 1
    for b in both:  # every process holds the same numbers, those of one process
        assert b["matrix"] == single["matrix"] and b["nme"] == single["nme"]
    written = json.loads((tmp_path / "two" / "results.json").read_text())
    assert written["accuracy_matrix"] == single["matrix"]
    # The main process alone writes files, and holds the lock.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".lock",
        "checkpoints",
        "metrics.jsonl",
        "results.json",
        "tensorboard",
    ]
    logged = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["global_step"] for line in logged if '"kind": "train"' in line]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "phase").iterdir()) == [
        "0",
        "1",
        "2",
    ]


def test_two_processes_resume_a_staged_run_with_one_process_numbers(tmp_path):
    """Every process restores the phase checkpoint into replicated arrays and goes on from it."""
    single = result(launch(0, 1, 0, tmp_path / "one"))
    port = free_port()
    staged = [result(p) for p in [launch(i, 2, port, tmp_path / "two", 0) for i in range(2)]]
    assert [len(s["matrix"]) for s in staged] == [1, 1]
    port = free_port()
    resumed = [result(p) for p in [launch(i, 2, port, tmp_path / "two") for i in range(2)]]
    for r in resumed:
        assert r["processes"] == 2
        assert r["matrix"] == single["matrix"] and r["nme"] == single["nme"]
