"""`moco eval linear` on SIGTERM/SIGUSR1: it saves where the epoch stood, exits 75, and --resume finishes the run
as if it had never stopped (same batches, same crops, same fc)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from moco_transfer.eval.linear import STATE_NAME, LinearConfig, TensorSource, train_sgd
from moco_transfer.signals import EXIT_STOPPED, StoppedBySignal

from .eval_helpers import make_checkpoint, make_image_folder, same_linear_result
from .signalled_runs import signal_when
from .test_linear import separable

CPU = torch.device("cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class StopAfter:
    """A StopRequest stand-in that reports a signal once `steps` batches have been drawn."""

    def __init__(self, source: TensorSource, steps: int) -> None:
        self.source, self.steps, self.signal_name = source, steps, "SIGTERM"

    @property
    def requested(self) -> bool:
        return self.source.drawn >= self.steps


class CountingSource(TensorSource):
    drawn = 0

    def train_batches(self, epoch: int):  # noqa: ANN201
        for batch in super().train_batches(epoch):
            self.drawn += 1
            yield batch


@pytest.mark.parametrize("stop_after", [13, 20])  # 10 batches an epoch: mid-epoch 2, and at the end of epoch 2
def test_stop_then_resume_matches_the_straight_run(tmp_path: Path, stop_after: int) -> None:
    xf, yf = separable(300, 0)
    xv, yv = separable(100, 1)
    cfg = LinearConfig(mode="cached", epochs=4, batch_size=32, lr=0.2)
    straight = train_sgd(TensorSource(xf, yf, xv, yv, 32, 0), 8, 4, cfg, CPU, show_batches=False)
    state = tmp_path / STATE_NAME
    source = CountingSource(xf, yf, xv, yv, 32, 0)
    with pytest.raises(StoppedBySignal, match="stopped by SIGTERM"):
        train_sgd(source, 8, 4, cfg, CPU, state, meta={"run": 1}, show_batches=False,
                  stop=StopAfter(source, stop_after))
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == (1 if stop_after == 13 else 2)
    if stop_after == 13:
        assert saved["mid_epoch"]["epoch"] == 1 and saved["mid_epoch"]["step"] == 3
        assert saved["mid_epoch"]["seen"] == [96]
    else:
        assert "mid_epoch" not in saved
    again = CountingSource(xf, yf, xv, yv, 32, 0)
    resumed = train_sgd(again, 8, 4, cfg, CPU, state, resume=True, meta={"run": 1}, show_batches=False)
    assert again.drawn == 40 - stop_after  # the batches before the stop are not produced again
    assert torch.equal(resumed["fc"].weight, straight["fc"].weight)
    keys = ("epoch", "lr", "train_loss", "top1", "top5")
    for a, b in zip(straight["history"], resumed["history"], strict=True):
        assert [a[k] for k in keys] == [b[k] for k in keys]
    assert "mid_epoch" not in torch.load(state, weights_only=True)


class Never:
    signal_name = None
    requested = False


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank left waiting in a collective (the other one stopped alone) fails the test after 30 s, not hangs it
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    try:
        xf, yf = separable(600, 0)
        xv, yv = separable(200, 1)
        cfg = LinearConfig(mode="cached", epochs=3, batch_size=64, lr=0.5)  # 10 batches of 32 per rank an epoch
        straight = train_sgd(TensorSource(xf, yf, xv, yv, 64, 0), 8, 4, cfg, CPU, show_batches=False)
        state = Path(folder) / STATE_NAME
        source = CountingSource(xf, yf, xv, yv, 64, 0)
        stop = StopAfter(source, 14) if rank == 1 else Never()  # only rank 1 is signalled
        try:
            train_sgd(source, 8, 4, cfg, CPU, state, show_batches=False, stop=stop)
            stopped_at = -1
        except StoppedBySignal:
            stopped_at = source.drawn
        resumed = train_sgd(TensorSource(xf, yf, xv, yv, 64, 0), 8, 4, cfg, CPU, state, resume=True,
                            show_batches=False)
        torch.save({"stopped_at": stopped_at, "same_fc": torch.equal(resumed["fc"].weight, straight["fc"].weight),
                    "same_history": [h["train_loss"] for h in resumed["history"]]
                    == [h["train_loss"] for h in straight["history"]]}, Path(folder) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_stop_at_one_step_when_one_is_signalled_and_resume_exactly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["stopped_at"] for r in ranks] == [14, 14]  # rank 0 was not signalled and stopped with rank 1
    assert all(r["same_fc"] and r["same_history"] for r in ranks)


def _linear(ckpt: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moco_transfer.cli", "eval", "linear", str(ckpt), "--data", str(data), "-o",
            str(out), "--epochs", "2", "-b", "6", "--lr", "0.01", "--no-cache", "--log-every", "0.05", *extra]


def _sigterm_in_epoch_2(command: list[str]) -> subprocess.CompletedProcess:
    """Run `command`; once its progress lines show epoch 2 past its first batch, send SIGTERM; wait for the end."""
    return signal_when(command, ENV, lambda line: line.startswith("epoch 2/2: ") and
                       not line.startswith("epoch 2/2: 0/"), lambda proc: proc.send_signal(signal.SIGTERM),
                       timeout=120)


@pytest.mark.slow
def test_moco_eval_linear_sigterm_mid_epoch_exits_75_and_resume_gives_the_straight_result(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck.pth.tar", image_size=16)
    names = ["a", "b", "c"]
    data = make_image_folder(tmp_path / "data", {"train": names}, per_class=60)  # 180 images: 30 batches of 6
    make_image_folder(tmp_path / "data", {"val": names}, per_class=10, seed=1)
    subprocess.run(_linear(ckpt, data, tmp_path / "straight", "-j", "0"), env=ENV, check=True, capture_output=True)
    stopped = _sigterm_in_epoch_2(_linear(ckpt, data, tmp_path / "run", "-j", "0"))
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "linear: stopped by SIGTERM in epoch 2 after batch" in stopped.stderr
    state = torch.load(tmp_path / "run" / STATE_NAME, weights_only=True)
    assert state["epoch"] == 1 and 0 < state["mid_epoch"]["step"] < 30
    assert not (tmp_path / "run" / "linear.json").exists()
    # a loader worker now: each image's crop is seeded by (seed, epoch, index), not by who loads it
    resumed = subprocess.run([*_linear(ckpt, data, tmp_path / "run", "-j", "1"), "--resume"], env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_linear_result(tmp_path / "straight", tmp_path / "run")
