"""Stopping and resuming in the middle of an epoch: signals, the mid-epoch checkpoint and what it must hold.

Clusters stop jobs with a signal shortly before they kill them (Slurm: SIGTERM, or SIGUSR1 with `--signal`).
`StopRequest` turns SIGTERM and SIGUSR1 into a flag that the training loop reads between steps; the run then
writes `checkpoint_mid_epoch.pth.tar` and exits with EXIT_STOPPED. The same file is written every
`--checkpoint-every-min` minutes, so a SIGKILL loses at most that much. It holds an epoch checkpoint, where the
epoch stood and every rank's random states (moco_transfer.step_loop.mid_epoch_record), so `--resume auto`
continues with the batches and views the epoch would have had.
"""

from __future__ import annotations

from pathlib import Path

from moco_transfer.checkpoint import CheckpointError, find_latest, load_checkpoint
from moco_transfer.signals import EXIT_STOPPED, STOP_SIGNALS, StoppedBySignal, StopRequest  # noqa: F401 - re-exported
from moco_transfer.step_loop import restore_random_states  # noqa: F401 - re-exported

MID_EPOCH_NAME = "checkpoint_mid_epoch.pth.tar"


def newest_checkpoint(folder: str | Path) -> Path | None:
    """The mid-epoch checkpoint when it is newer than the newest epoch checkpoint, else that one (or None)."""
    latest = find_latest(folder)
    mid = Path(folder) / MID_EPOCH_NAME
    if not mid.is_file():
        return latest
    try:
        mid_epoch = int(load_checkpoint(mid)["mid_epoch"]["epoch"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return latest  # a broken or foreign file: the epoch checkpoints decide
    completed = int(load_checkpoint(latest).get("epoch", 0)) if latest is not None else 0
    return mid if mid_epoch >= completed else latest
