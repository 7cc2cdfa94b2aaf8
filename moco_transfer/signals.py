"""Stop signals as a flag: SIGTERM and SIGUSR1 ask a long run to save its state and exit with EXIT_STOPPED.

Clusters stop jobs with a signal shortly before they kill them (Slurm: SIGTERM at the time limit, or SIGUSR1
ahead of it with `--signal`). A run that dies there loses everything since its last save; one that reads this
flag between steps can write a checkpoint and exit with a code that a job script takes as "requeue me".
Pretraining and the linear probe both read it, which is why it lives on the ground floor.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable
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


def _exit_when_parent_signals(signals: tuple[int, ...]) -> None:
    """A loader worker's thread: takes the blocked stop signals one at a time; a signal from the worker's parent
    (its `terminate`, e.g. multiprocessing's exit hook) ends the worker by that signal, as before; any other sender
    (the job's signal to every process) is dropped."""
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == os.getppid():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [info.si_signo])
            signal.pthread_kill(threading.get_ident(), info.si_signo)  # default action: the process ends


def _shield_worker(worker_id: int, then: Callable[[int], Any] | None = None) -> None:
    if hasattr(signal, "sigwaitinfo"):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # replaces PyTorch's handler; the signals wait, blocked, for the thread
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit the mask
        threading.Thread(target=_exit_when_parent_signals, args=(STOP_SIGNALS,), daemon=True,
                         name="stop-signal-filter").start()
    else:  # no sigwaitinfo (macOS): ignore them; the parent's normal shutdown still ends the worker
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if then is not None:
        then(worker_id)


def loader_worker_init(then: Callable[[int], Any] | None = None) -> Callable[[int], None]:
    """A DataLoader `worker_init_fn` that lets loader workers outlive the job's stop signal.

    Slurm (time limit, scancel, preemption), torchrun's agent and GNU timeout signal every process of the job,
    loader workers included. PyTorch's worker handler re-raises a SIGTERM that its parent did not send, the
    worker dies, and the parent's SIGCHLD handler raises "DataLoader worker (pid N) is killed by signal" before
    the run can save: the mid-epoch checkpoint and exit 75 never happen. Workers only read and augment, so they
    have nothing to save: here they drop a stop signal unless their parent sent it (which PyTorch's own handler
    checks the other way round), and the parent decides when they stop.
    `then` runs after (another init function, e.g. detectron2's reseeding). Picklable, for any start method.
    """
    return functools.partial(_shield_worker, then=then)


def shut_down_workers(batches: Any) -> None:
    """Stop a loader's worker processes now: an iterator of a DataLoader, or a DataLoader with persistent
    workers. Called from `finally` blocks, so that a stopped run's workers end with it rather than when the
    interpreter's exit hooks get to them (PyTorch's own shutdown does nothing by then). Anything else is left
    alone."""
    iterator = getattr(batches, "_iterator", batches)  # a DataLoader keeps its persistent iterator there
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if iterator is not batches and hasattr(batches, "_iterator"):
        batches._iterator = None
