"""TensorBoard event files, read back with tensorboard's own reader; W&B's missing-package error."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moco_transfer.run_log import TENSORBOARD_DIR, WANDB_ID_FILE, MonitorOptions, RunLog

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (restart markers applied: purged events are gone)."""
    acc = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_texts(folder: Path) -> list[str]:
    acc = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"tensors": 0})
    acc.Reload()
    return [e.tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag)]


def test_a_restart_hides_what_the_stopped_process_logged_past_its_checkpoint(tmp_path):
    with RunLog(tmp_path, MonitorOptions(tensorboard=True), name="first") as log:
        for step in range(10):
            log.scalars({"loss": float(step), "note": "text is left out", "flag": True}, step, prefix="train/")
    # The process saved its state after step 4 and died at 9; the next one starts at step 5.
    with RunLog(tmp_path, MonitorOptions(tensorboard=True), name="second", first_step=5) as log:
        for step in range(5, 8):
            log.scalars({"loss": 100.0 + step}, step, prefix="train/")
    scalars = read_scalars(tmp_path)
    assert set(scalars) == {"train/loss"}
    assert scalars["train/loss"] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0),
                                     (7, 107.0)]


def test_a_fresh_start_hides_every_older_event(tmp_path):
    with RunLog(tmp_path, MonitorOptions(tensorboard=True), name="old") as log:
        log.scalars({"x": 1.0}, 3)
    with RunLog(tmp_path, MonitorOptions(tensorboard=True), name="new") as log:
        log.scalars({"x": 2.0}, 1)
    assert read_scalars(tmp_path) == {"x": [(1, 2.0)]}


def test_a_restart_in_the_same_second_still_hides_older_events(tmp_path):
    # Within one second the names' pid and counter decide the readers' order, as text (".10" before ".9");
    # an older file named to sort last in its second stands for that case, whatever this host is called.
    with RunLog(tmp_path, MonitorOptions(tensorboard=True), name="old") as log:
        log.scalars({"x": 1.0}, 3)
    (old,) = (tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*")
    second = old.name.split(".")[3]
    old.rename(old.with_name(f"events.out.tfevents.{second}.~~~"))
    with RunLog(tmp_path, MonitorOptions(tensorboard=True), name="new") as log:
        log.scalars({"x": 2.0}, 1)
    assert read_scalars(tmp_path) == {"x": [(1, 2.0)]}


def test_off_and_other_ranks_write_nothing(tmp_path):
    with RunLog(tmp_path / "off", MonitorOptions(tensorboard=False), name="off") as log:
        assert not log.active
        log.scalars({"x": 1.0}, 0)
    with RunLog(tmp_path / "rank1", MonitorOptions(tensorboard=True), name="r1", main_process=False) as log:
        log.scalars({"x": 1.0}, 0)
    assert not (tmp_path / "off").exists() and not (tmp_path / "rank1").exists()


def test_wandb_without_the_package_is_an_error_naming_it(tmp_path):
    # sys.modules[name] = None is Python's own way to make a package unimportable (find_spec returns None).
    code = ("import sys; sys.modules['wandb'] = None; from moco_transfer.cli import main; "
            "main(['pretrain', '--epochs', '1', '-o', sys.argv[1], '--wandb'])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert run.returncode == 2 and "--wandb online: the package `wandb` is not installed" in run.stderr
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_logs_the_figures_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    options = MonitorOptions(tensorboard=False, wandb="offline")
    with RunLog(tmp_path, options, name="first", config={"moco_k": 32}) as log:
        log.scalars({"loss": 0.25, "diverged": float("nan")}, 1, prefix="train/")
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    with RunLog(tmp_path, options, name="resumed", first_step=2) as log:
        log.scalars({"loss": 0.125}, 2, prefix="train/")
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    # The service writes the record files; the test reads them in the same process, so it ends the service first
    # (as interpreter exit does): the CI once read both files without their history records after finish()
    # returned, under load (W&B's offline-mode data losses: wandb/wandb issues 5561, 10886).
    import wandb

    wandb.teardown()
    runs = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert [p.name for p in runs] == [f"run-{run_id}.wandb"] * 2  # one W&B run, two processes
    # W&B's record files are protobuf: the keys and JSON values are there as text (`wandb sync` uploads them).
    records = b"".join(p.read_bytes() for p in runs)
    assert b"train/loss" in records and b"0.25" in records and b"0.125" in records
    with RunLog(tmp_path, options, name="fresh") as log:  # a fresh start is another run
        log.scalars({"loss": 1.0}, 0)
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() != run_id


def test_pretraining_writes_every_logged_figure_and_its_config(tiny_folder, tmp_path):
    from moco_transfer.pretrain.engine import run_pretraining

    from .test_pretrain_engine import read_log, tiny_cfg

    out = tmp_path / "run"
    run_pretraining(tiny_cfg(tiny_folder, out, knn_every=1, knn_k=5, log_every=0.0))
    log, scalars = read_log(out), read_scalars(out)
    steps = 4  # 32 images in batches of 8
    for key in ("loss", "acc1", "lr", "images_per_s", "knn_top1", "online_probe_top1", "skipped_files"):
        assert [s for s, _ in scalars[f"epoch/{key}"]] == [steps, 2 * steps], key
        assert [v for _, v in scalars[f"epoch/{key}"]] == pytest.approx([r[key] for r in log], rel=1e-6), key
    for key in ("loss", "lr", "acc1", "images_per_s"):  # each host read of the step figures
        points = scalars[f"train/{key}"]
        assert points and all(0 < s <= 2 * steps for s, _ in points)
        assert [s for s, _ in points] == sorted({s for s, _ in points})
    config = read_texts(out)
    assert any("moco_k: 32" in t and "arch: 'resnet18'" in t for t in config)


def test_the_evaluators_write_their_figures(tmp_path, tiny_folder):
    from moco_transfer.eval.knn import KnnConfig, run_knn
    from moco_transfer.eval.linear import LinearConfig, run_linear
    from moco_transfer.pretrain.engine import run_pretraining

    from .test_pretrain_engine import tiny_cfg

    summary = run_pretraining(tiny_cfg(tiny_folder, tmp_path / "run", epochs=1, tensorboard=False))
    ckpt = summary["checkpoint"]
    report = run_knn(ckpt, tmp_path / "knn", str(tiny_folder), KnnConfig(ks=(5,), workers=0), use_cache=False,
                     monitors=MonitorOptions(tensorboard=True))
    knn = read_scalars(tmp_path / "knn")
    assert knn["knn/k5_top1"] == [(0, pytest.approx(report["knn"]["5"]["top1"]))]
    assert knn["retrieval/recall@1"] == [(0, pytest.approx(report["retrieval"]["recall@1"]))]
    linear = run_linear(ckpt, tmp_path / "linear", str(tiny_folder),
                        LinearConfig(mode="cached", epochs=3, batch_size=8, workers=0), use_cache=False,
                        monitors=MonitorOptions(tensorboard=True))
    scalars = read_scalars(tmp_path / "linear")
    assert [s for s, _ in scalars["linear/top1"]] == [1, 2, 3]
    assert [v for _, v in scalars["linear/top1"]] == pytest.approx([h["top1"] for h in linear["history"]])
    assert json.loads((tmp_path / "linear" / "linear.json").read_text())["final"]["top1"] == linear["final"]["top1"]
