"""The re-run check of `moco eval voc|coco` pins the data and the base seed; the default output folder names what
makes a run distinct. Most of it without detectron2; the end-to-end part (the real pre-flight on synthetic VOC
trees) skips without it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from moco_transfer.eval.detection import runner
from moco_transfer.eval.detection.benchmarks import COCO, VOC
from moco_transfer.eval.detection.runner import DetectionOptions, choose_output, default_output
from moco_transfer.eval.detection.trials import (
    RUN_VERSION,
    inspect_run,
    mismatch_message,
    trial_dir,
    update_run,
    write_metrics,
)

from .voc_synthetic import TINY, single_torch_thread, write_voc  # noqa: F401

SUBSET = {"voc_2007_trainval": {"images": 2, "sha256": "5b" * 32}, "voc_2007_test": {"images": 4, "sha256": "7e" * 32}}
FULL = {"voc_2007_trainval": {"images": 4, "sha256": "f0" * 32}, "voc_2007_test": {"images": 4, "sha256": "7e" * 32}}


def _fp(seed: int | None = 0, root: str | None = "/data/VOCdevkit", datasets: dict | None = None) -> dict:
    fp = {"version": RUN_VERSION, "checkpoint_sha256": "aa" * 32, "config_sha256": "cf", "legacy_config_sha256": "l",
          "config": {"SOLVER.BASE_LR": 0.02}}
    extra = {"seed": seed, "data_root": root, "datasets": SUBSET if datasets is None else datasets}
    return fp | {k: v for k, v in extra.items() if v is not None}


def _finished(out: Path, k: int, seed: int) -> None:
    write_metrics(trial_dir(out, k), {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}, seed=seed)


def test_another_seed_or_dataset_is_a_difference_a_moved_copy_is_not(tmp_path):
    update_run(tmp_path, **_fp())
    _finished(tmp_path, 0, seed=0)
    assert inspect_run(tmp_path, _fp()).differences == []

    check = inspect_run(tmp_path, _fp(seed=10))  # --seed 10 on a folder finished with seed 0
    assert check.differences == ["base seed (0 -> 10; trial k trains with base seed + k)"]
    msg = mismatch_message(tmp_path, check)
    assert "1 finished trial(s) (0)" in msg and "base seed (0 -> 10" in msg and "--fresh" in msg

    check = inspect_run(tmp_path, _fp(root="/data/full", datasets=FULL))  # trials of a subset, then the full set
    assert check.differences == [
        f"dataset files (root /data/VOCdevkit -> /data/full): voc_2007_trainval 2 images (sha256 {'5b' * 6}) -> "
        f"4 images (sha256 {'f0' * 6})"]
    check = inspect_run(tmp_path, _fp(datasets=FULL))  # the same root, its split files changed
    assert check.differences[0].startswith("dataset files: voc_2007_trainval 2 images")

    check = inspect_run(tmp_path, _fp(root="/scratch/job7/VOCdevkit"))  # the same files, copied elsewhere
    assert check.differences == [] and "/data/VOCdevkit -> /scratch/job7/VOCdevkit" in check.moved
    # data not identified by content (a config whose datasets are not under the root): the roots decide
    update_run(tmp_path, **_fp(datasets={}))
    assert inspect_run(tmp_path, _fp(root="/elsewhere", datasets={})).differences == [
        "dataset root /data/VOCdevkit -> /elsewhere"]


def test_a_record_from_before_the_pin_takes_the_seed_from_its_trials(tmp_path):
    """run.json written before the data and seed were pinned: the finished trials' metrics (or an interrupted
    trial's config.yaml) say which base seed they ran with; the data is not compared (it was not recorded)."""
    update_run(tmp_path, **_fp(seed=None, root=None, datasets={}))
    _finished(tmp_path, 1, seed=1)
    assert inspect_run(tmp_path, _fp(seed=0, root="/anywhere")).differences == []
    assert inspect_run(tmp_path, _fp(seed=10)).differences == ["base seed (0 -> 10; trial k trains with base seed + k)"]
    other = tmp_path / "interrupted"
    update_run(other, **_fp(seed=None, root=None, datasets={}))
    trial_dir(other, 2).mkdir()
    (trial_dir(other, 2) / "last_checkpoint").write_text("model_0000001.pth")
    (trial_dir(other, 2) / "config.yaml").write_text("OUTPUT_DIR: x\nSEED: 7\n")
    assert inspect_run(other, _fp(seed=0)).differences == ["base seed (5 -> 0; trial k trains with base seed + k)"]


def test_default_output_names_what_makes_the_run_distinct(tmp_path):
    """Every 200-epoch run ends in checkpoint_0199.pth.tar: the content hash tells them apart; a non-default
    config, --opts that change the training target and a non-zero seed are named; execution settings are not."""
    ck = Path("runs/moco_v2/checkpoint_0199.pth.tar")
    a, b = "3f" * 32, "9c" * 32
    assert default_output(VOC, ck, a) == Path("runs/voc/checkpoint_0199-3f3f3f3f")
    assert default_output(VOC, Path("other/checkpoint_0199.pth.tar"), b) == Path("runs/voc/checkpoint_0199-9c9c9c9c")
    for same in ("c4-24k", "voc_R_50_C4_24k_moco.yaml"):  # the default config, however it is named
        assert default_output(VOC, ck, a, same, ["DATALOADER.NUM_WORKERS", "8"]) == default_output(VOC, ck, a)
    assert default_output(VOC, ck, a, seed=10) == Path("runs/voc/checkpoint_0199-3f3f3f3f-seed10")
    assert default_output(VOC, ck, a, "/my/cfgs/voc fpn.yaml").name == "checkpoint_0199-3f3f3f3f-voc_fpn"
    short = default_output(VOC, ck, a, opts=["SOLVER.MAX_ITER", "12000"])
    assert re.fullmatch(r"checkpoint_0199-3f3f3f3f-opts[0-9a-f]{6}", short.name)
    assert short != default_output(VOC, ck, a, opts=["SOLVER.MAX_ITER", "6000"])
    assert default_output(COCO, ck, a, "fpn-1x") == Path("runs/coco/checkpoint_0199-3f3f3f3f")
    assert default_output(COCO, ck, a, "coco_R_50_C4_2x_moco.yaml") == Path("runs/coco/checkpoint_0199-3f3f3f3f-c4-2x")


def test_trials_in_the_old_default_folder_continue_there(tmp_path, monkeypatch):
    """A folder of the earlier default (runs/voc/<stem>) whose trials match this run keeps them: the re-run after
    the upgrade resumes instead of starting over; one that does not match (another seed) is left alone."""
    monkeypatch.chdir(tmp_path)
    ck = Path("ckpts/checkpoint_0199.pth.tar")
    legacy = Path("runs/voc/checkpoint_0199")
    update_run(legacy, **_fp(seed=None, root=None, datasets={}))  # an earlier version's record
    _finished(legacy, 0, seed=0)
    lines: list[str] = []
    chosen = choose_output(DetectionOptions(checkpoint=ck, data_root=tmp_path), "aa" * 32, _fp(), lines.append)
    assert chosen == legacy and "the default folder before it was named checkpoint_0199-aaaaaaaa" in lines[0]
    chosen = choose_output(DetectionOptions(checkpoint=ck, data_root=tmp_path, seed=3), "aa" * 32, _fp(seed=3),
                           lines.append)
    assert chosen == Path("runs/voc/checkpoint_0199-aaaaaaaa-seed3") and lines[-1] == f"output: {chosen}"
    given = DetectionOptions(checkpoint=ck, data_root=tmp_path, output=tmp_path / "mine")
    assert choose_output(given, "aa" * 32, _fp(), lines.append) == tmp_path / "mine"


# --- with detectron2: the real pre-flight ---------------------------------------------------------------------


def _record_finished_run(options: DetectionOptions, out: Path) -> None:
    """What a finished one-trial run leaves (run.json with the real fingerprint, the trial's metrics), without the
    minutes of training: the pre-flight's own functions make the fingerprint."""
    from moco_transfer.eval.detection.prepare import build_config, run_fingerprint
    from moco_transfer.fileio import sha256_file

    cfg = build_config(options, echo=lambda _: None)
    layout = runner._check_datasets(cfg, options, echo=lambda _: None)
    update_run(out, benchmark="voc", **run_fingerprint(cfg, sha256_file(options.checkpoint), options.data_root,
                                                       options.seed, layout.datasets()))
    _finished(out, 0, seed=options.seed)


def test_the_preflight_refuses_another_seed_or_dataset_and_resumes_a_moved_copy(moco_checkpoint, tmp_path,
                                                                                  monkeypatch):
    pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")
    from moco_transfer.cli import main
    from moco_transfer.eval.report import build_report
    from moco_transfer.fileio import sha256_file

    monkeypatch.chdir(tmp_path)
    subset = write_voc(tmp_path / "subset", n_trainval07=2)
    full = write_voc(tmp_path / "full", n_trainval07=4)
    sha = sha256_file(moco_checkpoint)
    out = default_output(VOC, moco_checkpoint, sha, opts=TINY)  # where a run without --output goes
    assert out.parent == Path("runs/voc") and out.name.startswith(f"checkpoint_0000-{sha[:8]}-opts")
    _record_finished_run(DetectionOptions(checkpoint=moco_checkpoint, data_root=subset, opts=TINY, gpus=0), out)

    def cli(*extra: str):
        return CliRunner().invoke(main, ["eval", "voc", str(moco_checkpoint), "--output", str(out), "--trials", "1",
                                         "--gpus", "0", *extra, "--opts", *TINY])

    res = cli("--voc-root", str(full))  # the subset's finished trial must not count for the full set
    assert res.exit_code == 1 and "finished earlier" not in res.output
    assert re.search(rf"run with a different dataset files \(root {subset} -> {full}\): .*voc_2007_trainval 2 images "
                     r"\(sha256 [0-9a-f]{12}\) -> 4 images", res.output), res.output
    res = cli("--voc-root", str(subset), "--seed", "10")
    assert res.exit_code == 1 and "base seed (0 -> 10; trial k trains with base seed + k)" in res.output
    assert "finished earlier" not in res.output

    copy = Path(shutil.copytree(subset, tmp_path / "scratch" / "VOCdevkit"))  # the job's copy on local disk
    options = DetectionOptions(checkpoint=moco_checkpoint, data_root=copy, opts=TINY, gpus=0, trials=1)  # no output
    lines: list[str] = []
    summary = runner.run_detection(options, echo=lines.append)
    text = "\n".join(lines)
    assert options.output == out and f"output: {out}" in text
    assert f"dataset root {subset} -> {copy}, the same dataset files" in text and "its trials continue" in text
    assert "trial 1/1 (seed 0): finished earlier" in text and summary["trials_finished"] == 1
    assert json.loads((out / "run.json").read_text())["data_root"] == str(copy)
    report = build_report([tmp_path / "runs"])  # `moco report runs/` finds the default folder's trials
    assert "| 80.0 | 50.0 | 55.0 |" in report.markdown and report.sources == [(tmp_path / out)]
