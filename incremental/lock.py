"""One writer per work directory: an advisory lock held for the life of a run.

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
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"The work directory {workdir} is in use by another run ({holder}); wait for it "
                "to end (or stop it: it saves and the same command resumes), or pick another "
                "--workdir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
