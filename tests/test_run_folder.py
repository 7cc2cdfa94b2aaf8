"""What a user does to a run folder: run again into it, resume with a changed option, change the world size
mid-epoch, share its files with a team. Nothing of the first run may be lost or silently re-described."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from moco_transfer.checkpoint import atomic_save, load_checkpoint
from moco_transfer.fileio import write_json_atomic
from moco_transfer.pretrain import engine
from moco_transfer.pretrain.config import ConfigError, resolve_config
from moco_transfer.pretrain.data import EpochSampler
from moco_transfer.pretrain.engine import run_pretraining
from moco_transfer.pretrain.preemption import MID_EPOCH_NAME

TINY = dict(arch="resnet18", small_images=True, image_size=16, batch_size=8, moco_k=32, bn_splits=2,
            workers=0, epochs=1, moco_m=0.99)


def tiny_cfg(data: Path, output: Path, **kw):
    return resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(output), **kw})


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moco_transfer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_second_pretrain_into_a_folder_with_a_run_is_refused_and_the_run_kept(tiny_folder, tmp_path, one_thread):
    args = ["pretrain", "--data", str(tiny_folder), "-o", str(tmp_path), "--arch", "resnet18", "--small-images",
            "--image-size", "16", "--batch-size", "8", "--moco-k", "32", "--bn-splits", "2", "--epochs", "1",
            "--moco-m", "0.99", "-j", "0"]
    assert _cli(*args).returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert "checkpoint_0000.pth.tar" in before and "log.jsonl" in before
    again = _cli(*args, "--seed", "1")
    assert again.returncode == 2
    message = " ".join(again.stderr.split())
    assert f"--output {tmp_path}: holds a run (checkpoint_0000.pth.tar" in message
    assert "--resume auto" in message and "--output DIR" in message and "--force" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # not a byte changed

    forced = _cli(*args, "--seed", "1", "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    aside = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("replaced-")]
    assert len(aside) == 1
    assert {p.name: p.read_bytes() for p in aside[0].iterdir() if p.is_file()} == before  # the first run, whole
    if importlib.util.find_spec("tensorboard") is not None:  # and its TensorBoard curves, apart from the new run's
        assert list((aside[0] / "tensorboard").glob("events.out.tfevents.*"))
        assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert load_checkpoint(tmp_path / "checkpoint_0000.pth.tar")["config"]["seed"] == 1
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 1


@pytest.mark.parametrize("change, option", [
    ({"seed": 1}, "--seed: checkpoint 0, now 1"),
    ({"moco_t": 0.07}, "--moco-t: checkpoint 0.2, now 0.07"),
    ({"moco_m": 0.9}, "--moco-m: checkpoint 0.99, now 0.9"),
    ({"lr": 0.5}, "--lr: checkpoint None, now 0.5"),
    ({"aug_plus": False}, "--aug-plus: checkpoint True, now False"),
    ({"image_size": 24}, "--image-size: checkpoint 16, now 24"),
    ({"cos": False}, "--cos: checkpoint True, now False"),
])
def test_resume_with_a_changed_recipe_setting_names_it(tiny_folder, tmp_path, one_thread, change, option):
    run_pretraining(tiny_cfg(tiny_folder, tmp_path))
    config_before = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=option.replace("(", r"\(")):
        run_pretraining(tiny_cfg(tiny_folder, tmp_path, epochs=2, **change), resume="auto")
    assert (tmp_path / "config.yaml").read_bytes() == config_before  # the record still describes the run


def test_resume_with_other_data_is_refused_but_the_same_folder_by_another_path_is_not(tiny_folder, tmp_path,
                                                                                       one_thread, monkeypatch):
    run_pretraining(tiny_cfg(tiny_folder, tmp_path / "run"))
    other = tmp_path / "other"
    other.symlink_to(tiny_folder / "val", target_is_directory=True)
    with pytest.raises(ConfigError, match="--data: checkpoint"):
        run_pretraining(tiny_cfg(other, tmp_path / "run", epochs=2), resume="auto")
    monkeypatch.chdir(tiny_folder.parent)
    summary = run_pretraining(tiny_cfg(Path(tiny_folder.name), tmp_path / "run", epochs=2, workers=1,
                                       knn_every=1, knn_k=3), resume="auto")
    assert summary["epochs"] == 2  # a longer run, relative --data, other workers and monitors: allowed


def test_a_mid_epoch_checkpoint_keeps_its_place_at_another_world_size(tiny_folder, tmp_path):
    """The first b global batches are the same images at any world size, so the weights' batches are not
    trained twice: the position, and the running sums as the old ranks' mean, carry over."""
    size, batch = 32, 8
    for world in (2, 4):
        one = EpochSampler(size, batch)
        many = [EpochSampler(size, batch // world, world, r) for r in range(world)]
        for s in [one, *many]:
            s.set_epoch_seed(11)
        first = list(one)
        for b in range(size // batch):
            global_batch = {i for s in many for i in list(s)[b * (batch // world):(b + 1) * (batch // world)]}
            assert global_batch == set(first[b * batch:(b + 1) * batch])
    states = [{"cpu": torch.get_rng_state(), "cuda": None, "pipeline": None, "loss_sum": 6.0, "acc_sum": 100.0},
              {"cpu": torch.get_rng_state(), "cuda": None, "pipeline": None, "loss_sum": 8.0, "acc_sum": 50.0}]
    ckpt = {"epoch": 1, "mid_epoch": {"epoch": 1, "step": 3, "rng": states}}
    position, mine = engine._mid_epoch_start(ckpt, tmp_path / MID_EPOCH_NAME)
    assert (position.epoch, position.step) == (1, 3)
    assert (position.loss_sum, position.acc_sum) == (7.0, 75.0)
    assert mine.get("cpu") is None and mine.get("pipeline") is None  # the epoch's seeded generators stay


def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        write_json_atomic({"a": 1}, tmp_path / "result.json")
        atomic_save({"a": torch.zeros(1)}, tmp_path / "ckpt.pth.tar")
        expected = stat.S_IMODE(plain.stat().st_mode)
        assert expected == 0o640
        for name in ("result.json", "ckpt.pth.tar"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    finally:
        os.umask(old)


def test_pretraining_imports_and_runs_on_a_torchvision_without_decode_jpeg(tiny_folder, tmp_path):
    """torchvision 0.29 deprecates its image codecs: without decode_jpeg the CPU pipeline must still work, and
    the device pipeline must say why it cannot decode."""
    code = f"""
import torchvision.io
del torchvision.io.decode_jpeg
import torch
from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.engine import run_pretraining
from moco_transfer.pretrain.gpu_pipeline import device_problem
cfg = resolve_config("mocov2", overrides=dict({TINY!r}, data={str(tiny_folder)!r}, output={str(tmp_path)!r},
                     data_pipeline="cpu"))
print(run_pretraining(cfg)["epochs"])
print(device_problem(torch.device("cuda", 0)))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-2] == "1"
    assert "has no torchvision.io.decode_jpeg" in lines[-1] and "--data-pipeline cpu" in lines[-1]
