"""What writing metrics.jsonl and TensorBoard files costs a digits run, measured, not assumed.

    python scripts/logging_overhead.py [--repeats=5] [--every_steps=0]

Runs the default digits config (finetune, 5 phases) alternately with the metrics log on (jsonl and
TensorBoard, the default) and off, in one process after a warm-up run (so both read the same
compiled programs), and prints the median seconds in phases (train + eval) of each and their ratio.
`--every_steps=1` returns the metrics after every step, the most writing there can be.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import digits  # noqa: E402
from incremental import run as run_lib  # noqa: E402


def one_run(logging: bool, every_steps: int) -> float:
    config = digits.get_config()
    config.log.progress = config.log.plot = False
    config.log.tensorboard = logging
    config.checkpoint.every_steps = every_steps
    original = run_lib.MetricsLog
    if not logging:  # the run's log, switched off
        run_lib.MetricsLog = lambda workdir, **kw: original(workdir, **{**kw, "enabled": False})
    try:
        with tempfile.TemporaryDirectory() as workdir:
            results = run_lib.run(config, os.path.join(workdir, "run"))
    finally:
        run_lib.MetricsLog = original
    return sum(p["train_seconds"] + p["eval_seconds"] for p in results["phases"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every_steps", type=int, default=0)
    args = parser.parse_args()
    one_run(True, args.every_steps)  # warm-up: compiles, fills the caches
    seconds = {True: [], False: []}
    for _ in range(args.repeats):
        for logging in (True, False):
            seconds[logging].append(one_run(logging, args.every_steps))
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"seconds in phases, median of {args.repeats}: logging {on:.3f}, none {off:.3f}")
    print(f"ratio {on / off:.3f} (every_steps={args.every_steps})")


if __name__ == "__main__":
    main()
