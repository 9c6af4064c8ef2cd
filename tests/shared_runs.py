"""Trained work directories shared by the whole test session, across pytest-xdist workers.

`shared_run(name, make)` returns the work directory `$INCREMENTAL_TEST_CACHE/runs/<name>`, made by
`make(workdir)` the first time any worker asks for it (under a file lock, so a second worker waits
and reuses it). Tests must only read it: copy it (`shutil.copytree`) to change it.
"""

import fcntl
import os
from collections.abc import Callable

DONE = ".made"


def shared_run(name: str, make: Callable[[str], object]) -> str:
    root = os.path.join(os.environ["INCREMENTAL_TEST_CACHE"], "runs")
    os.makedirs(root, exist_ok=True)
    workdir = os.path.join(root, name)
    with open(os.path.join(root, f"{name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.exists(os.path.join(workdir, DONE)):
            make(workdir)
            open(os.path.join(workdir, DONE), "w").close()
    return workdir
