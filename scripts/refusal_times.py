"""How long `incremental run` takes to refuse bad input: whole-process seconds, per kind of input.

    python scripts/refusal_times.py              # 5 repeats of each case
    python scripts/refusal_times.py --repeats=1

Each case is a command line that must end with exit status 2, a one-line message and no traceback,
before any work directory is written; the script checks that and prints, per case, the median and
the maximum wall seconds of a fresh process (the interpreter's start included), then the median
and maximum over all cases. Refusals the config schema makes (`incremental/schema.py`) come before
JAX is imported; those that need the data or a registry (an unknown method, a protocol that does
not fit the classes) come after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "mistyped key": ["--config.train.lrr=0.1"],
    "value of another type": ["--config.seed=abc"],
    "negative lr": ["--config.train.lr=-0.1"],
    "negative epochs": ["--config.train.epochs=-1"],
    "momentum out of range": ["--config.train.momentum=1.5"],
    "bad freeze regex": ['--config.train.freeze=(("[", True),)'],
    "unknown method argument": [
        "--config=configs/digits.py:method=lwf",
        "--config.method_args.strenght=3",
    ],
    "config arg naming no method": ["--config=configs/digits.py:method=nonsense"],
    "unknown method": ["--config.method=icarll"],
    "unknown model": ["--config.model.name=vit"],
    "impossible protocol": ["--config.protocol.increment=3"],
    "memory smaller than classes": [
        "--config=configs/digits.py:method=replay",
        "--config.memory.budget=5",
    ],
}


def refuse(args: list[str]) -> float:
    """Seconds until `incremental run ARGS` refused; raises if it did not refuse as it must."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = os.path.join(tmp, "w")
        cmd = [sys.executable, "-m", "incremental.main", "run", *args, f"--workdir={workdir}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        seconds = time.perf_counter() - start
        out = proc.stdout + proc.stderr
        if proc.returncode != 2 or "Traceback" in out or os.path.exists(workdir):
            raise RuntimeError(f"{args} was not refused cleanly (status {proc.returncode}):\n{out}")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="processes per case")
    args = parser.parse_args()
    every = []
    print(f"{'case':32} {'median s':>9} {'max s':>7}", flush=True)
    for name, case in CASES.items():
        times = [refuse(case) for _ in range(args.repeats)]
        every += times
        print(f"{name:32} {statistics.median(times):9.2f} {max(times):7.2f}", flush=True)
    print(f"{'all':32} {statistics.median(every):9.2f} {max(every):7.2f}")


if __name__ == "__main__":
    main()
