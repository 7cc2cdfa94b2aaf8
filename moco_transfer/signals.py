"""Stop signals as a flag: SIGTERM and SIGUSR1 ask a long run to save its state and exit with EXIT_STOPPED.

Clusters stop jobs with a signal shortly before they kill them (Slurm: SIGTERM at the time limit, or SIGUSR1
ahead of it with `--signal`). A run that dies there loses everything since its last save; one that reads this
flag between steps can write a checkpoint and exit with a code that a job script takes as "requeue me".
Pretraining and the linear probe both read it, which is why it lives on the ground floor.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

# sysexits' EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Slurm scripts requeue on it.
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """The run stopped on a signal after saving its state; run it again with resume to continue."""

    exit_code = EXIT_STOPPED


class StopRequest:
    """SIGTERM and SIGUSR1 set `signal_name`; the loop reads it between steps. Handlers are restored on close.

    The handler only records the signal, so a second signal while the checkpoint is written changes nothing:
    the save finishes and the run exits once. Installed only from the main thread (Python's rule for signals).
    Installing replaces an inherited "ignore" too (a job script's `trap '' USR1` that shields torchrun's agent).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()
