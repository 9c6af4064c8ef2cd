"""SIGTERM and SIGINT: a run saves, then stops (the same command resumes); a short command stops.

`Preemption` turns the first signal into a request that the loops check between calls of the
jitted step (a run) or between phases (`config.seeds`); they save and raise `Preempted`. A second
signal stops at once with a one-line message and the shell's status for the signal (130 for
SIGINT, 143 for SIGTERM); the checkpoints already complete stay valid. `Interruptible` is for the
commands that only read a work directory or write a new one (evaluate, surgery): the first signal
stops them at once, the same way.
"""

from __future__ import annotations

import signal
import threading


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT once the run has saved; re-running the same command resumes."""


class _Handlers:
    """Installs the subclass's `_handle(signum, frame)` for SIGTERM and SIGINT in the body (from
    the main thread only)."""

    def __init__(self, console=None):
        self._previous = {}
        self._console = console

    def _say(self, message: str) -> None:
        if self._console is not None:
            self._console.print(message, soft_wrap=True, markup=False)
        else:
            print(message, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Preemption(_Handlers):
    """Turns SIGTERM and SIGINT into a request to save and stop after the current call of the step.

    A call runs `config.checkpoint.every_steps` steps when that is set, else to the epoch's end.
    """

    def __init__(self, console=None):
        super().__init__(console)
        self.requested = False

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.requested:
            self._say(f"{name} again: stopping now; the last complete checkpoint resumes the run.")
            raise SystemExit(128 + signum)
        self.requested = True
        self._say(
            f"{name}: finishing the current steps, saving, then stopping (signal again to stop "
            "at once)."
        )


class Interruptible(_Handlers):
    """SIGTERM and SIGINT stop the body at once with a one-line message and the signal's status;
    the `SystemExit` unwinds, so the code writing a new directory removes its half-written copy."""

    def _handle(self, signum, frame):
        del frame
        self._say(f"{signal.Signals(signum).name}: stopped; nothing was changed.")
        raise SystemExit(128 + signum)
