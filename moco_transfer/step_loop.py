"""Steps that stop, save and resume mid-epoch: the one protocol of pretraining and the linear probe.

Each step's figures (loss, counts) stay on the device; the host reads them in one transfer about every
SYNC_SECONDS, so no step waits for the device. All ranks must decide a stop or a save at the same step, or one
would go on alone into the next collective and hang: in one process that is free, over gloo one small host
all-reduce a step, and over NCCL (where it would wait for the device) it waits for the reads, which then fall
every `every` steps on all ranks. An EpochPosition (steps done, this rank's running sums) saved with every
rank's sums (`mid_epoch_record`) lets a resumed run end the epoch with an uninterrupted run's figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from moco_transfer import distributed as du
from moco_transfer.signals import StoppedBySignal, StopRequest

SYNC_SECONDS = 1.0  # how often the host reads the step figures from the device (one sync each time)


@dataclass
class EpochPosition:
    """Where epoch `epoch` (0-based) stood: `step` batches done, this rank's running sums by name, their seconds."""

    epoch: int
    step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def __getattr__(self, name: str) -> float:  # position.loss_sum: a running sum
        try:
            return self.__dict__["sums"][name]
        except KeyError:
            raise AttributeError(name) from None


class StepLoop:
    """A run's epochs: `run` yields an epoch's batches, each step `put`s its figures. `save(position)` writes the
    mid-epoch checkpoint (every `save_every_s`, and on a stop, which then raises StoppedBySignal) and returns
    where; `name` and `resume` go into the stop's message."""

    def __init__(self, name: str = "training", stop: StopRequest | None = None,
                 save: Callable[[EpochPosition], Any] | None = None, save_every_s: float = 0.0,
                 seconds: float = SYNC_SECONDS, resume: str = "--resume auto") -> None:
        self.name, self.stop, self.save, self.save_every_s = name, stop, save, save_every_s
        self.seconds, self.resume = seconds, resume
        self.every = 10  # NCCL: steps between reads, from the step rate after the first epoch
        self.position = EpochPosition(0)

    def put(self, *figures: torch.Tensor | float) -> None:
        """This step's figures, one per name given to `run` (0-d tensors stay on the device until a read)."""
        self._rows.append(figures)

    def run(self, batches: Iterable[Any], start: EpochPosition, total: int, names: Sequence[str],
            device: torch.device, read: Callable[[list[list[float]]], None] | None = None) -> Iterator[Any]:
        """Yield the epoch's batches from `start` (`total` left). Each read sums the figures into `position` by name
        (row by row: the sums do not depend on when the reads fall), then `read(rows)` sees them. A stop agreed
        before the last batch ends the epoch after the step in progress, without drawing another batch."""
        self.position = at = EpochPosition(start.epoch, start.step, {k: start.sums.get(k, 0.0) for k in names},
                                           start.seconds)
        distributed = du.is_distributed()
        aligned = distributed and dist.get_backend() == "nccl"
        begin = last_read = last_save = time.perf_counter()
        done, self._rows = 0, []  # each step's figures since the last read

        def read_rows() -> None:
            rows, self._rows = self._rows, []
            tensors = [v for row in rows for v in row if isinstance(v, torch.Tensor)]
            values = iter(torch.stack(tensors).tolist() if tensors else [])
            rows = [[next(values) if isinstance(v, torch.Tensor) else float(v) for v in row] for row in rows]
            for row in rows:
                for name, value in zip(names, row, strict=True):
                    at.sums[name] += value
            at.step, at.seconds = start.step + done, start.seconds + time.perf_counter() - begin
            if read is not None and rows:
                read(rows)

        for batch in batches:
            yield batch
            done += 1
            now = time.perf_counter()
            if aligned and done % self.every:
                continue
            flags = [self.stop is not None and self.stop.requested,
                     self.save is not None and 0 < self.save_every_s <= now - last_save]
            stop, save = du.agree(flags) if distributed else flags
            if aligned or stop or save or now - last_read >= self.seconds:
                read_rows()
                last_read = now
            if done < total and stop:
                getattr(batches, "close", lambda: None)()  # a progress bar, a device pipeline's producer
                raise StoppedBySignal(f"{self.name}: stopped by {self.stop.signal_name} in epoch {at.epoch + 1} "
                                      f"after batch {at.step} of {start.step + total}; wrote {self.save(at)}. "
                                      f"Continue with {self.resume}.")
            if done < total and save:
                self.save(at)
                last_save = time.perf_counter()
        read_rows()
        if aligned:  # the same `every` on all ranks: from the mean step rate
            rate = du.all_reduce_mean(done / max(time.perf_counter() - begin, 1e-9), device)
            self.every = max(1, min(1000, round(self.seconds * rate)))

    def stop_after(self, epoch: int, epochs: int, wrote: Any) -> None:
        """Between epochs (every rank calls it): a stop asked on any rank ends the run after `epoch` unless it was
        the last, its state written to `wrote`."""
        if epoch + 1 < epochs and du.agree([self.stop is not None and self.stop.requested])[0]:
            raise StoppedBySignal(f"{self.name}: stopped by {self.stop.signal_name} after epoch {epoch + 1}; wrote "
                                  f"{wrote}. Continue with {self.resume}.")


def mid_epoch_record(at: EpochPosition, device: torch.device, pipeline: torch.Tensor | None = None) -> dict[str, Any]:
    """What a mid-epoch checkpoint holds: where the epoch stood, and every rank's running sums (a list per name, in
    rank order) and random states (`rng`: the global CPU and CUDA generators, which e.g. MoCo's key shuffle draws
    from, and a `pipeline` generator's state). A collective: every rank calls it."""
    mine = {"sums": at.sums, "rng": {"cpu": torch.get_rng_state(), "pipeline": pipeline,
                                     "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
    ranks: list[Any] = [mine]
    if du.is_distributed():
        ranks = [None] * du.world_size()
        dist.all_gather_object(ranks, mine)
    return {"epoch": at.epoch, "step": at.step, "train_seconds": at.seconds, "rng": [r["rng"] for r in ranks],
            **{name: [r["sums"][name] for r in ranks] for name in at.sums}}


def resume_position(mid: dict[str, Any], names: Sequence[str]) -> tuple[EpochPosition, dict[str, Any]]:
    """This rank's position in a `mid_epoch_record` and its states ({} if none); written by another number of
    ranks: the writers' mean sums (an epoch's figures are means over ranks), no states. Older files: sums in rng."""
    rows = mid.get("rng") or []
    sums = {k: mid[k] if k in mid else [row.get(k, 0.0) for row in rows] for k in names}
    same = all(len(v) == du.world_size() for v in sums.values())
    mine = {k: float(v[du.rank()]) if same else sum(map(float, v)) / max(len(v), 1) for k, v in sums.items()}
    position = EpochPosition(int(mid["epoch"]), int(mid["step"]), mine, float(mid.get("train_seconds", 0.0)))
    return position, rows[du.rank()] if same and rows else {}


def restore_random_states(states: dict[str, Any], device: torch.device) -> None:
    """Set this rank's saved generators; missing ones (a resume at another world size) are left as seeded."""
    if states.get("cpu") is not None:
        torch.set_rng_state(states["cpu"])
    if states.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
