"""Stop requests from the scheduler: SIGTERM (preemption, scancel) and SIGUSR1 (SLURM's `--signal=USR1@300`
warning before the time limit) end training cleanly at the next step boundary instead of killing it mid-step.

The handlers only record the request; the training loop polls it after every step (a Python attribute read,
no device sync), writes a checkpoint and raises :class:`TrainingInterrupted`, whose exit status tells
Snakemake (retries) and SLURM (requeue) to run the job again, which then resumes where it stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_TEMPFAIL = 75  # sysexits.h EX_TEMPFAIL: "try again later"; distinct from errors (2) and crashes (1)


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after writing a checkpoint; running the same command again resumes it.

    A SystemExit, so that `har train`, `python -m har.cli` and Snakemake's `script:` jobs all end with
    :data:`EXIT_TEMPFAIL` without each mapping it, and `except Exception` blocks do not swallow the stop.
    """

    def __init__(self, message: str):
        super().__init__(EXIT_TEMPFAIL)
        self.message = message

    def __str__(self) -> str:
        return self.message


class StopRequest:
    """The first stop signal received while :func:`stop_requests` is active (None: keep going)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """Record SIGTERM / SIGUSR1 instead of dying, and restore the previous handlers on exit.

    Python only lets the main thread install handlers; elsewhere (a thread running `train`) the signals keep
    their handlers and the returned request never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {sig: signal.signal(sig, request._handle) for sig in STOP_SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
