"""Stopping and resuming in the middle of an epoch: signals, the mid-epoch checkpoint and what it must hold.

Clusters stop jobs with a signal shortly before they kill them (Slurm: SIGTERM, or SIGUSR1 with `--signal`).
`StopRequest` turns SIGTERM and SIGUSR1 into a flag that the training loop reads between steps; the run then
writes `checkpoint_mid_epoch.pth.tar` and exits with EXIT_STOPPED. The same file is written every
`--checkpoint-every-min` minutes, so a SIGKILL loses at most that much. It holds everything an epoch
checkpoint holds plus where the epoch stood: the batch reached, the running loss and accuracy sums, and every
rank's random states (the global CPU and CUDA generators that the key shuffle draws from, and the device
pipeline's augmentation generator), so `--resume auto` continues with the batches and views the epoch would
have had.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moco_transfer import distributed as du
from moco_transfer.checkpoint import CheckpointError, find_latest, load_checkpoint
from moco_transfer.signals import EXIT_STOPPED, STOP_SIGNALS, StoppedBySignal, StopRequest  # noqa: F401 - re-exported

MID_EPOCH_NAME = "checkpoint_mid_epoch.pth.tar"


@dataclass
class EpochPosition:
    """Where an epoch stood: `step` batches done, with their summed loss and top-1 (%), and the online probe's
    correct and labelled counts."""

    epoch: int  # 0-based index of the epoch in progress
    step: int
    loss_sum: float
    acc_sum: float
    probe_correct: float = 0.0
    probe_seen: float = 0.0


def rank_states(at: EpochPosition, pipeline_state: torch.Tensor | None, device: torch.device
                ) -> list[dict[str, Any]]:
    """Every rank's generators and running sums (each rank sums its own batches), gathered on all ranks (rank
    r's at index r): a collective in a process group."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "pipeline": pipeline_state.cpu() if pipeline_state is not None else None,
            "loss_sum": at.loss_sum, "acc_sum": at.acc_sum, "probe_correct": at.probe_correct,
            "probe_seen": at.probe_seen}
    if not du.is_distributed():
        return [mine]
    gathered: list[Any] = [None] * du.world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def restore_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Set this rank's saved generators; missing entries (a resume at another world size) are left seeded."""
    if states.get("cpu") is not None:
        torch.set_rng_state(states["cpu"])
    if states.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


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
