"""The command line: `incremental run [--config=configs/NAME.py[:ARG]] [--config.x.y=V] [--workdir=DIR]`.

Parses flags and calls `run.run`; re-running the same command with the same `--workdir` resumes.
"""

from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags
from rich.markup import escape

from incremental import report
from incremental import run as run_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "digits.py")
COMMANDS = ("run",)
PREEMPTED_EXIT_CODE = 3  # stopped by SIGTERM/SIGINT after saving; the same command resumes

config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file, optionally with ':ARG'.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Work directory (default: runs/<dataset>-<method>-<time>).")


def default_workdir(config) -> str:
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", config.dataset.name.split("/")[-1])
    return os.path.join("runs", f"{dataset}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: list[str]) -> None:
    if argv[1:] != ["run"]:
        raise app.UsageError(f"Usage: incremental {'|'.join(COMMANDS)} [--flags]; got {argv[1:]}.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or default_workdir(config)
    report.console.print(f"work directory: {workdir}")
    try:
        results = run_lib.run(config, workdir)
    except (ValueError, TypeError, FloatingPointError) as error:
        report.console.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        sys.exit(2)
    except run_lib.Preempted as stopped:
        command = " ".join(sys.argv)
        if not flags.FLAGS.workdir:
            command += f" --workdir={workdir}"
        report.console.print(f"{stopped} Re-run to resume: {command}", soft_wrap=True, markup=False)
        sys.exit(PREEMPTED_EXIT_CODE)
    report.print_summary(results, workdir)


def check_config_file(argv: list[str]) -> None:
    """A clear message for a --config file that is missing or defines no get_config."""
    for arg in argv:
        if arg.startswith("--config="):
            path = arg.removeprefix("--config=").split(":", 1)[0]
            if not os.path.isfile(path):
                sys.exit(f"error: config file {path} does not exist; configs are in configs/*.py.")
            with open(path) as f:
                if "def get_config" not in f.read():
                    sys.exit(
                        f"error: config file {path} defines no get_config(arg=None) returning an "
                        "ml_collections.ConfigDict; see configs/digits.py for an example."
                    )


def entry_point() -> None:
    check_config_file(sys.argv)
    app.run(main)


if __name__ == "__main__":
    entry_point()
