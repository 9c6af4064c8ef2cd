"""One writer per work directory: an advisory lock held for the life of a run (or a surgery's output).

The lock is `fcntl.flock` on `WORKDIR/.lock`, which also holds the holder's PID and command line for
the refusal message. The kernel releases it when its process ends, however it ends, so the lock of
a killed run is simply taken by the next one. Advisory: only processes that ask for it (every
`incremental run` of this project) are kept out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds `workdir`'s lock for the body; raises ValueError when another process holds it."""
    advice = (
        "wait for it to end (or stop it: it saves and the same command resumes), or pick another "
        "--workdir"
    )
    with hold_file(os.path.join(workdir, LOCK_FILE), f"The work directory {workdir}", advice):
        yield


@contextlib.contextmanager
def hold_file(path: str, what: str, advice: str, remove: bool = False) -> Iterator[None]:
    """Holds the lock file `path` for the body, or raises ValueError naming `what`, the holder and
    the `advice`. With `remove`, the file is deleted before it is released: a process that opened
    it meanwhile then holds a lock on a file no one else sees, so whatever it guards must be
    checked again once the lock is held (`surgery` checks that its output is still absent)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{what} is in use by another process ({holder}); {advice}.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
        try:
            yield
        finally:
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(path)
    finally:
        os.close(fd)  # releases the lock
