"""The pretraining loop on tiny data: checkpoints, logs, resume after SIGKILL, faults, official files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moco_transfer.checkpoint import CheckpointError, atomic_save, find_latest, load_checkpoint
from moco_transfer.pretrain.config import ConfigError, resolve_config
from moco_transfer.pretrain.engine import TrainingDiverged, build_model, load_model_state, run_pretraining

from .conftest import write_class_folders

TINY = dict(arch="resnet18", small_images=True, image_size=16, batch_size=8, moco_k=32, bn_splits=2,
            workers=0, epochs=2, moco_m=0.99)


def tiny_cfg(data: Path, output: Path, **kw):
    return resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(output), **kw})


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_run_writes_official_checkpoint_layout(tiny_folder, tmp_path):
    cfg = tiny_cfg(tiny_folder, tmp_path / "run", knn_every=1, knn_k=5)
    summary = run_pretraining(cfg)
    ckpt_path = tmp_path / "run" / "checkpoint_0001.pth.tar"
    assert Path(summary["checkpoint"]) == ckpt_path
    assert not (tmp_path / "run" / "checkpoint_0000.pth.tar").exists()  # only the newest is kept
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["arch"] == "resnet18"
    sd = ckpt["state_dict"]
    assert {"module.queue", "module.queue_ptr", "module.encoder_q.conv1.weight",
            "module.encoder_k.fc.2.weight"} <= set(sd)
    assert all(k.startswith(("module.encoder_q.", "module.encoder_k.", "module.queue")) for k in sd)
    assert int(sd["module.queue_ptr"]) == (2 * 4 * 8) % 32  # 2 epochs x 4 full batches of 8
    assert ckpt["config"]["moco_k"] == 32 and "optimizer" in ckpt
    log = read_log(tmp_path / "run")
    assert [r["epoch"] for r in log] == [1, 2]
    assert {"loss", "lr", "acc1", "images_per_s", "skipped_files", "knn_top1"} <= set(log[0])
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in log)
    assert log[1]["lr"] == pytest.approx(0.03 * 8 / 256 * 0.5)  # cosine, epoch 1 of 2
    assert (tmp_path / "run" / "config.yaml").exists()


def test_keep_every_keeps_older_checkpoints(tiny_folder, tmp_path):
    run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=3, keep_every=2))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*")) == [
        "checkpoint_0001.pth.tar", "checkpoint_0002.pth.tar"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "moco_transfer.cli", "pretrain", *args]


def _tiny_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["--data", str(data), "--output", str(out), "--arch", "resnet18", "--small-images",
            "--image-size", "16", "--batch-size", "8", "--moco-k", "32", "--bn-splits", "2", "-j", "0",
            "--epochs", str(epochs), "--moco-m", "0.99", "--seed", "3"]


def kill_and_resume_matches_straight_run(data: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run 4 epochs straight; run again, SIGKILL it in epoch 3, `--resume auto`: the same losses and weights.

    The straight run and the run to be killed go side by side (one thread each), which saves one run's wall
    time. Returns the straight run (its output captured as text) for checks of what it printed.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    straight_cmd = _cli(*_tiny_args(data, straight, 4), *extra)
    with open(tmp_path / "straight.out", "w") as out, open(tmp_path / "straight.err", "w") as err:
        straight_proc = subprocess.Popen(straight_cmd, env=env, stdout=out, stderr=err, text=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_tiny_args(data, killed, 4), *extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoint_0001.pth.tar").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 3 (or in the middle of its save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code = straight_proc.wait(timeout=300)
    done = subprocess.CompletedProcess(straight_cmd, code, (tmp_path / "straight.out").read_text(),
                                       (tmp_path / "straight.err").read_text())
    assert code == 0, done.stderr[-3000:]
    latest = find_latest(killed)
    assert latest is not None and load_checkpoint(latest)["epoch"] in (2, 3)
    subprocess.run(_cli(*_tiny_args(data, killed, 4), *extra, "--resume", "auto"), check=True, env=env,
                   capture_output=True)
    a, b = read_log(straight), read_log(killed)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["acc1"] == pytest.approx(ra["acc1"], abs=1e-3)
    sa = load_checkpoint(straight / "checkpoint_0003.pth.tar")["state_dict"]
    sb = load_checkpoint(killed / "checkpoint_0003.pth.tar")["state_dict"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)
    return done


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data = write_class_folders(tmp_path / "data", classes=2, per_class=24)  # 6 steps per epoch
    kill_and_resume_matches_straight_run(data, tmp_path)


@pytest.mark.slow
def test_sigkill_then_resume_with_a_loader_worker_matches_uninterrupted_run(tmp_path):
    """As above with one loader worker (`-j 1`, the embedded preset's): the views are drawn in the worker,
    seeded from the loader's generator, so resuming must reseed it as an uninterrupted run does."""
    data = write_class_folders(tmp_path / "data", classes=2, per_class=16)  # 4 steps per epoch
    kill_and_resume_matches_straight_run(data, tmp_path, "-j", "1")


def test_atomic_save_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    atomic_save({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"epoch": 2, "state_dict": {"w": Unpicklable()}}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth.tar"]  # no temporary file left behind


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tiny_folder, tmp_path, monkeypatch):
    from moco_transfer.pretrain import engine

    run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=1))
    good = load_checkpoint(tmp_path / "checkpoint_0000.pth.tar")
    monkeypatch.setattr(engine, "lr_at_epoch", lambda *args: 1e30)  # the recipe is kept; its second epoch diverges
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at epoch 2"):
        run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=2), resume="auto")
    after = load_checkpoint(tmp_path / "checkpoint_0000.pth.tar")
    assert not (tmp_path / "checkpoint_0001.pth.tar").exists()
    assert all(torch.equal(good["state_dict"][k], after["state_dict"][k]) for k in good["state_dict"])


def test_official_release_layout_loads(tiny_folder, tmp_path):
    """Official release files may hold only module.encoder_q.*; they resume and fine-tune all the same."""
    cfg = tiny_cfg(tiny_folder, tmp_path / "a", epochs=1)
    model = build_model(cfg)
    official = {"epoch": 200, "arch": "resnet18",
                 "state_dict": {f"module.{k}": v for k, v in model.state_dict().items() if k.startswith("encoder_q.")}}
    path = tmp_path / "moco_v2_200ep_pretrain.pth.tar"
    torch.save(official, path)
    fresh = build_model(cfg)
    notes = load_model_state(fresh, load_checkpoint(path)["state_dict"], str(path))
    assert any("key encoder" in n for n in notes)
    assert torch.equal(fresh.encoder_k.conv1.weight, model.encoder_q.conv1.weight)
    assert torch.equal(fresh.encoder_q.fc[2].weight, model.encoder_q.fc[2].weight)
    bare = {k: v for k, v in model.state_dict().items()}  # a non-DDP save without `module.`
    load_model_state(build_model(cfg), bare, "bare")


def test_checkpoint_that_does_not_fit_is_an_error(tiny_folder, tmp_path):
    cfg = tiny_cfg(tiny_folder, tmp_path, epochs=1)
    v1 = build_model(tiny_cfg(tiny_folder, tmp_path, epochs=1, mlp=False))
    with pytest.raises(CheckpointError, match="does not fit the configured model"):
        load_model_state(build_model(cfg), v1.state_dict(), "v1.pth")
    with pytest.raises(CheckpointError, match="not a MoCo pretraining checkpoint"):
        load_model_state(build_model(cfg), {"conv1.weight": torch.zeros(1)}, "resnet.pth")


def test_resume_with_other_settings_is_refused(tiny_folder, tmp_path):
    run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="--moco-k: checkpoint 32, now 64"):
        run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=2, moco_k=64), resume="auto")
    with pytest.raises(ConfigError, match="--head-bn: checkpoint False, now True"):
        run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=2, head_bn=True), resume="auto")


def test_corrupt_files_are_counted_in_the_log(tmp_path):
    data = write_class_folders(tmp_path / "data", classes=2, per_class=8)
    (data / "class_0" / "img_003.png").write_bytes(b"\x89PNG broken")
    run_pretraining(tiny_cfg(data, tmp_path / "out", epochs=1))
    assert read_log(tmp_path / "out")[0]["skipped_files"] == 1


def test_too_little_data_is_a_clear_error(tmp_path):
    from moco_transfer.data import DataError

    data = write_class_folders(tmp_path / "data", classes=1, per_class=3)
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        run_pretraining(tiny_cfg(data, tmp_path / "out", epochs=1))


def test_bf16_autocast_and_channels_last_run_on_cpu(tiny_folder, tmp_path):
    summary = run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=1, amp="bf16", channels_last=True))
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["state_dict"]["module.queue"].dtype == torch.float32
    assert torch.isfinite(torch.tensor(summary["last"]["loss"]))
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        run_pretraining(tiny_cfg(tiny_folder, tmp_path / "fp16", epochs=1, amp="fp16", device="cpu"))
