"""What a detection run reports as a plain message rather than a traceback, and the run's stop on a signal."""

from __future__ import annotations

from moco_transfer.detectron2_ext import Detectron2Missing
from moco_transfer.signals import StoppedBySignal

from .layouts import LayoutError
from .trials import RunMismatch


class SetupError(RuntimeError):
    """A problem found before training (config, GPUs, weights); the message says what to fix."""


class DoesNotFit(RuntimeError):
    """A trial does not fit in GPU memory (pre-flight) or ran out of it (training); the message lists options."""


class TrialFailed(RuntimeError):
    """A trial's process ended with an error other than out-of-memory; the message points at its log."""


class RunStopped(StoppedBySignal):
    """The run stopped on a signal (exit code 75); stopped trials kept a checkpoint, the same command resumes."""


# Everything `moco eval voc|coco` reports as a plain error message before training starts.
SETUP_ERRORS = (Detectron2Missing, SetupError, LayoutError, RunMismatch)
# ... and everything it reports as a plain message at all.
REPORTED_ERRORS = (*SETUP_ERRORS, DoesNotFit, TrialFailed)
