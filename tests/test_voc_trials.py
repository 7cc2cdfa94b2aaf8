"""VOC trial bookkeeping, dataset layout checks and the fewer-GPU rule, on real files and without detectron2."""

from __future__ import annotations

import json
import statistics

import pytest

from moco_transfer.eval.gpu_scaling import scale_to_gpus
from moco_transfer.eval.voc_layout import VocLayoutError, check_voc_root, our_name, voc_names
from moco_transfer.eval.voc_trials import (
    RunMismatch,
    TrialState,
    check_run,
    read_metrics,
    summarize,
    trial_dir,
    trial_seed,
    trial_state,
    write_metrics,
)

from .voc_synthetic import write_voc


def test_trial_states_follow_files(tmp_path):
    t0 = trial_dir(tmp_path, 0)
    assert trial_state(t0) is TrialState.NEW
    t0.mkdir()
    (t0 / "last_checkpoint").write_text("model_0000001.pth")
    assert trial_state(t0) is TrialState.INTERRUPTED
    write_metrics(t0, {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}, seed=0)
    assert trial_state(t0) is TrialState.FINISHED
    (t0 / "metrics.json").write_text('{"AP": 1')  # torn write: the trial is redone, not trusted
    assert trial_state(t0) is TrialState.INTERRUPTED
    assert len({trial_seed(7, k) for k in range(5)}) == 5


def test_summary_mean_std_and_markdown(tmp_path):
    values = [(55.0, 81.0, 61.0), (56.0, 82.0, 62.0), (57.5, 82.5, 64.0)]
    for k, (ap, ap50, ap75) in enumerate(values):
        write_metrics(trial_dir(tmp_path, k), {"AP": ap, "AP50": ap50, "AP75": ap75}, seed=k, start_iter=0)
    summary = summarize(tmp_path, trials=5, info={"checkpoint": "x.pth.tar"})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["trials_finished"] == 3 and summary["trials_requested"] == 5
    assert [r["trial"] for r in summary["trials"]] == [0, 1, 2]
    assert summary["mean"]["AP"] == pytest.approx(statistics.fmean([55.0, 56.0, 57.5]))
    assert summary["std"]["AP75"] == pytest.approx(statistics.stdev([61.0, 62.0, 64.0]))
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | 1 | 56.00 | 82.00 | 62.00 |" in md
    assert f"| mean | | {summary['mean']['AP']:.2f} |" in md
    assert "3 of 5 trials finished" in md


def test_single_trial_has_no_std_and_nan_becomes_null(tmp_path):
    write_metrics(trial_dir(tmp_path, 0), {"AP": float("nan"), "AP50": 1.0, "AP75": 0.0}, seed=0)
    summary = summarize(tmp_path, trials=1)
    assert summary["std"] == {"AP": None, "AP50": None, "AP75": None}
    assert summary["mean"]["AP"] is None and summary["mean"]["AP50"] == 1.0
    assert "null" in (tmp_path / "summary.json").read_text()
    assert read_metrics(trial_dir(tmp_path, 0))["AP"] is None


def test_metrics_must_hold_all_keys(tmp_path):
    with pytest.raises(ValueError, match="AP75"):
        write_metrics(tmp_path, {"AP": 1.0, "AP50": 2.0}, seed=0)
    assert read_metrics(tmp_path) is None


def test_run_fingerprint_guards_the_folder(tmp_path):
    fp = {"checkpoint_sha256": "aa", "config_sha256": "bb"}
    assert check_run(tmp_path, fp, record=False) is False and not (tmp_path / "run.json").exists()
    assert check_run(tmp_path, fp) is False and (tmp_path / "run.json").is_file()
    assert check_run(tmp_path, dict(fp)) is True  # same run: fine
    with pytest.raises(RunMismatch, match="config_sha256"):
        check_run(tmp_path, {"checkpoint_sha256": "aa", "config_sha256": "cc"})


def test_voc_layout_ok_and_names(tmp_path):
    write_voc(tmp_path)
    names = ["moco_voc_2007_trainval", "voc_2012_trainval", "voc_2007_test", "coco_2017_train"]
    assert voc_names(names) == ["voc_2007_trainval", "voc_2012_trainval", "voc_2007_test"]
    assert check_voc_root(tmp_path, names) == {"voc_2007_trainval": 4, "voc_2012_trainval": 2, "voc_2007_test": 4}
    assert our_name("voc_2007_test") == "moco_voc_2007_test" and our_name("coco_2017_val") == "coco_2017_val"


def test_voc_layout_errors_name_what_is_missing(tmp_path):
    write_voc(tmp_path)
    names = ["voc_2007_trainval", "voc_2012_trainval", "voc_2007_test"]
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    first = sorted((tmp_path / "VOC2012" / "Annotations").iterdir())[0]
    first.unlink()
    with pytest.raises(VocLayoutError) as info:
        check_voc_root(tmp_path, names)
    msg = str(info.value)
    assert "voc_2007_test: missing split file" in msg and "test.txt" in msg
    assert "voc_2012_trainval: 1 of 2 ids" in msg and first.stem in msg
    assert "DIR/VOC2012/Annotations/*.xml" in msg  # the expected layout is spelled out
    with pytest.raises(VocLayoutError, match="not a folder"):
        check_voc_root(tmp_path / "nowhere", names)


def test_scale_rule_for_fewer_gpus():
    base = dict(ims_per_batch=16, base_lr=0.02, steps=(18000, 22000), max_iter=24000)
    assert scale_to_gpus(**base, num_gpus=8) == []
    assert scale_to_gpus(**base, num_gpus=4) == []  # 4 images per GPU fit
    changes = {c.key: c.new for c in scale_to_gpus(**base, num_gpus=2)}
    assert changes == {"SOLVER.IMS_PER_BATCH": 8, "SOLVER.BASE_LR": pytest.approx(0.01),
                       "SOLVER.STEPS": (36000, 44000), "SOLVER.MAX_ITER": 48000}
    assert {c.key: c.new for c in scale_to_gpus(**base, num_gpus=0)}["SOLVER.MAX_ITER"] == 48000  # CPU = 1 device
    assert scale_to_gpus(**base, num_gpus=2, max_ims_per_gpu=8) == []  # big-memory GPUs keep 16
    assert str(scale_to_gpus(**base, num_gpus=1)[1]) == "SOLVER.BASE_LR: 0.02 -> 0.01"


def test_missing_detectron2_is_a_clear_error_before_anything(monkeypatch, tmp_path):
    """Where detectron2 cannot be imported, `moco eval voc` says how to install it and touches nothing."""
    import sys

    from click.testing import CliRunner

    from moco_transfer.cli import main

    monkeypatch.setitem(sys.modules, "detectron2", None)  # makes the import fail exactly as when it is absent
    ckpt = tmp_path / "c.pth.tar"
    ckpt.write_bytes(b"")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["eval", "voc", str(ckpt), "--voc-root", str(tmp_path), "--output", str(out),
                                    "--gpus", "0"])
    assert res.exit_code == 1
    assert "detectron2 is not installed" in res.output and "pip install --no-build-isolation" in res.output
    assert not out.exists()
