"""Stopping on a signal mid-epoch and resuming at the same step; time-based checkpoints; elastic restarts.

The references are uninterrupted runs of the same command: a resumed run must log their per-epoch losses
(to 1e-4; on the CPU they come out equal) and end with their weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moco_transfer.checkpoint import atomic_save, load_checkpoint
from moco_transfer.pretrain.preemption import EXIT_STOPPED, MID_EPOCH_NAME, StopRequest, newest_checkpoint

from .conftest import write_class_folders
from .signalled_runs import signal_when
from .test_gpu_pipeline import write_jpeg_folders

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "-o", str(out), "--arch", "resnet18", "--small-images", "--image-size",
            "16", "--batch-size", "8", "--moco-k", "32", "--bn-splits", "2", "--epochs", "4", "--moco-m", "0.99",
            "--seed", "3", "--log-every", "0.05", *extra]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moco_transfer.cli", *args]


def _torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", str(restarts), "-m",
            "moco_transfer.cli", *args]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _signal_in_epoch_2(command: list[str], sigs: list[int], workers: bool = False) -> subprocess.CompletedProcess:
    """Run `command`; once rank 0's progress line shows epoch 2 under way, send `sigs` to it, or to each of its
    worker processes (torchrun's children); wait for the end."""
    preexec = (lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)) if workers else None  # noqa: E731

    def send(proc: subprocess.Popen) -> None:
        targets = ([int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                     text=True).stdout.split()] if workers else [proc.pid])
        for pid in targets:
            for sig in sigs:
                os.kill(pid, sig)

    return signal_when(command, ENV, lambda line: line.startswith("epoch 2/4: ") and
                       not line.startswith("epoch 2/4: 0/"), send, preexec_fn=preexec)


def _same_run(reference: Path, resumed: Path) -> None:
    a, b = _log(reference), _log(resumed)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-4)
        assert rb["acc1"] == pytest.approx(ra["acc1"], abs=1e-3)
    ca = load_checkpoint(reference / "checkpoint_0003.pth.tar")
    cb = load_checkpoint(resumed / "checkpoint_0003.pth.tar")
    sa, sb = ca["state_dict"], cb["state_dict"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)
    assert not (resumed / MID_EPOCH_NAME).exists()  # stale once its epoch has a checkpoint
    # The online probe (on by default: the folders have labels) resumes exactly too.
    for ra, rb in zip(a, b, strict=True):
        assert rb["online_probe_top1"] == pytest.approx(ra["online_probe_top1"], abs=1e-3)
    pa, pb = ca["online_probe"]["module"], cb["online_probe"]["module"]
    assert all(torch.allclose(pa[k].float(), pb[k].float(), atol=1e-5) for k in pa)
    if importlib.util.find_spec("tensorboard") is not None:
        _curves_continue(resumed, b)


def _curves_continue(resumed: Path, log: list[dict]) -> None:
    """TensorBoard shows each step once across the stopped and the resumed process, with the log's values."""
    from .test_run_log import read_scalars

    scalars = read_scalars(resumed)
    steps = [s for s, _ in scalars["epoch/loss"]]
    assert len(steps) == len(log) and steps == sorted(set(steps))
    assert [v for _, v in scalars["epoch/loss"]] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    reads = [s for s, _ in scalars["train/loss"]]
    assert reads == sorted(set(reads)) and reads[-1] == steps[-1]


def _stopped_mid_epoch_2(out: Path, steps_per_epoch: int) -> int:
    mid = load_checkpoint(out / MID_EPOCH_NAME)
    assert mid["epoch"] == 1 and mid["mid_epoch"]["epoch"] == 1  # one epoch done, the second in progress
    step = mid["mid_epoch"]["step"]
    assert 0 < step < steps_per_epoch
    return step


@pytest.fixture(scope="module")
def straight_cpu(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Class folders of 96 images (12 steps per epoch) and the uninterrupted 4-epoch run on them."""
    root = tmp_path_factory.mktemp("straight_cpu")
    data = write_class_folders(root / "data", classes=2, per_class=48)
    subprocess.run(_cli(*_args(data, root / "straight", "-j", "1")), env=ENV, check=True, capture_output=True)
    return data, root / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_sigterm_mid_epoch_then_resume_gives_the_straight_runs_losses(tmp_path, pipeline, straight_cpu):
    extra = ("--data-pipeline", pipeline, "-j", "1")
    if pipeline == "cpu":
        data, straight = straight_cpu
    else:
        data, straight = write_jpeg_folders(tmp_path / "data", classes=4, per_class=24), tmp_path / "straight"
        subprocess.run(_cli(*_args(data, straight, *extra)), env=ENV, check=True, capture_output=True)
    stopped = _signal_in_epoch_2(_cli(*_args(data, tmp_path / "run", *extra)), [signal.SIGTERM])
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-2000:]
    step = _stopped_mid_epoch_2(tmp_path / "run", 12)
    assert f"stopped by SIGTERM in epoch 2 after batch {step} of 12; wrote " in stopped.stderr
    resumed = subprocess.run(_cli(*_args(data, tmp_path / "run", *extra, "--resume", "auto")), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"in epoch 2, after its batch {step}" in resumed.stderr + resumed.stdout
    _same_run(straight, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_stops_cleanly_and_resumes(tmp_path, straight_cpu):
    """As GNU timeout, scancel and torchrun's agent do: the signal reaches every process of the job, the two
    loader workers included. They must keep serving the parent, which saves, exits 75 at once, and leaves no
    process behind; the resumed run (other worker count: views are per image) equals the uninterrupted one."""
    data, straight = straight_cpu
    group: list[int] = []

    def send(proc: subprocess.Popen) -> None:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2, workers  # the loader's processes are alive when the signal comes
        group.append(proc.pid)  # the leader of its own session: its pid is the group's id
        os.killpg(proc.pid, signal.SIGTERM)

    began = time.time()
    stopped = signal_when(_cli(*_args(data, tmp_path / "run", "-j", "2")), ENV,
                          lambda line: line.startswith("epoch 2/4: ") and not line.startswith("epoch 2/4: 0/"),
                          send, timeout=60, preexec_fn=os.setsid)
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert "DataLoader worker" not in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    step = _stopped_mid_epoch_2(tmp_path / "run", 12)
    assert f"stopped by SIGTERM in epoch 2 after batch {step} of 12" in stopped.stderr
    assert time.time() - began < 60
    left = subprocess.run(["pgrep", "-g", str(group[0])], capture_output=True, text=True)
    assert left.returncode == 1, left.stdout  # nothing of the job's process group is left running
    resumed = subprocess.run(_cli(*_args(data, tmp_path / "run", "-j", "1", "--resume", "auto")), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_run(straight, tmp_path / "run")


@pytest.mark.slow
def test_sigusr1_to_two_gloo_workers_stops_both_at_one_step_and_resumes(tmp_path):
    """As Slurm's --signal does: every worker gets SIGUSR1 (the launcher here is told to ignore it)."""
    data = write_class_folders(tmp_path / "data", classes=2, per_class=96)  # 192 images: 24 steps of 4 per rank
    subprocess.run(_torchrun(*_args(data, tmp_path / "straight")), env=ENV, check=True, capture_output=True)
    stopped = _signal_in_epoch_2(_torchrun(*_args(data, tmp_path / "run")), [signal.SIGUSR1], workers=True)
    assert stopped.returncode != 0 and "stopped by SIGUSR1 in epoch 2 after batch" in stopped.stderr, \
        stopped.stderr[-3000:]
    _stopped_mid_epoch_2(tmp_path / "run", 24)
    assert len(load_checkpoint(tmp_path / "run" / MID_EPOCH_NAME)["mid_epoch"]["rng"]) == 2  # both ranks' states
    resumed = subprocess.run(_torchrun(*_args(data, tmp_path / "run", "--resume", "auto")), env=ENV,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_run(tmp_path / "straight", tmp_path / "run")


@pytest.mark.slow
def test_time_based_checkpoint_limits_what_a_sigkill_loses(tmp_path, straight_cpu):
    data, straight = straight_cpu
    extra = ("-j", "1", "--checkpoint-every-min", "0.002")  # 0.12 s: several mid-epoch saves per epoch here
    proc = subprocess.Popen(_cli(*_args(data, tmp_path / "run", *extra)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    mid, deadline = tmp_path / "run" / MID_EPOCH_NAME, time.time() + 240
    while time.time() < deadline:
        if mid.exists() and load_checkpoint(mid)["mid_epoch"]["epoch"] == 1:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert newest_checkpoint(tmp_path / "run").name in (MID_EPOCH_NAME, "checkpoint_0001.pth.tar")
    subprocess.run(_cli(*_args(data, tmp_path / "run", *extra, "--resume", "auto")), env=ENV, check=True,
                   capture_output=True)
    _same_run(straight, tmp_path / "run")


@pytest.mark.slow
def test_torchrun_restarts_a_group_that_lost_a_worker_and_logs_each_epoch_once(tmp_path):
    data = write_class_folders(tmp_path / "data", classes=2, per_class=48)
    out = tmp_path / "run"
    command = _torchrun(*_args(data, out, "--resume", "auto", "--log-every", "0"), restarts=1)
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoint_0001.pth.tar").exists():
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output
    assert [r["epoch"] for r in _log(out)] == [1, 2, 3, 4]


def test_auto_prefers_the_mid_epoch_file_only_when_it_is_newer(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    epoch_ckpt = tmp_path / "checkpoint_0002.pth.tar"
    atomic_save({"epoch": 3, "state_dict": {}}, epoch_ckpt)
    assert newest_checkpoint(tmp_path) == epoch_ckpt
    mid = tmp_path / MID_EPOCH_NAME
    atomic_save({"epoch": 2, "state_dict": {}, "mid_epoch": {"epoch": 2, "step": 5}}, mid)  # older: epoch 3 done
    assert newest_checkpoint(tmp_path) == epoch_ckpt
    atomic_save({"epoch": 3, "state_dict": {}, "mid_epoch": {"epoch": 3, "step": 5}}, mid)
    assert newest_checkpoint(tmp_path) == mid
    mid.write_bytes(b"not a checkpoint")
    assert newest_checkpoint(tmp_path) == epoch_ckpt


def test_a_second_signal_changes_nothing_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGTERM) is before


def test_random_weights_knn_is_taken_from_the_checkpoint_on_resume(tiny_folder, tmp_path, monkeypatch, one_thread):
    from moco_transfer.pretrain import engine
    from moco_transfer.pretrain.config import resolve_config

    cfg = dict(data=str(tiny_folder), output=str(tmp_path), arch="resnet18", small_images=True, image_size=16,
               batch_size=8, moco_k=32, bn_splits=2, workers=0, moco_m=0.99, knn_k=5, print_baseline=True)
    built = []
    real_build = engine.build_resnet
    def build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the random-weights encoder has no num_classes
        if "num_classes" not in kwargs:
            built.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(engine, "build_resnet", build)
    first = engine.run_pretraining(resolve_config("mocov2", overrides={**cfg, "epochs": 1}))
    assert len(built) == 1
    second = engine.run_pretraining(resolve_config("mocov2", overrides={**cfg, "epochs": 2}), resume="auto")
    assert len(built) == 1 and second["knn_top1_random_init"] == first["knn_top1_random_init"]
    engine.run_pretraining(resolve_config("mocov2", overrides={**cfg, "epochs": 3, "knn_k": 3}), resume="auto")
    assert len(built) == 2  # another k: measured again
