"""The benchmark specs and the COCO side of the trial bookkeeping and dataset checks, without detectron2."""

from __future__ import annotations

import json
import statistics

import pytest

from moco_transfer.eval.detection.benchmarks import COCO, VOC, get_benchmark
from moco_transfer.eval.detection.layouts import LayoutError, check_coco_root, coco_names, our_name
from moco_transfer.eval.detection.trials import (
    RunBook,
    TrialState,
    format_trial_line,
    read_metrics,
    read_run,
    summarize,
    trial_dir,
    trial_state,
    update_run,
    write_metrics,
)

from .coco_synthetic import write_coco

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_result(box_ap: float, mask_ap: float, apl: float = float("nan")) -> dict:
    """An evaluator's result as COCOEvaluator returns it: per task, the six metrics and per-class APs."""
    def task(ap: float) -> dict:
        return {"AP": ap, "AP50": ap + 20, "AP75": ap + 2, "APs": ap - 10, "APm": ap, "APl": apl,
                "AP-triangle": ap}
    return {"bbox": task(box_ap), "segm": task(mask_ap)}


def test_coco_metrics_layout_summary_and_line(tmp_path):
    runs = [(40.0, 36.0), (40.6, 36.3), (41.2, 36.9)]
    for k, (box, mask) in enumerate(runs):
        write_metrics(trial_dir(tmp_path, k), COCO.record(_coco_result(box, mask)), seed=k, benchmark=COCO, amp=True)
    m = read_metrics(trial_dir(tmp_path, 0), COCO)
    assert set(m) == {"bbox", "segm", "seed", "amp"} and set(m["bbox"]) == set(KEYS)  # per-class APs dropped
    assert m["bbox"]["APl"] is None and m["segm"]["AP50"] == 56.0
    assert read_metrics(trial_dir(tmp_path, 0)) is None  # read as VOC's flat layout, it is not a VOC result
    summary = summarize(tmp_path, 4, {"config": "fpn-1x"}, COCO)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["benchmark"] == "coco" and summary["trials_finished"] == 3 and summary["trials_requested"] == 4
    assert summary["trials"][1]["bbox"]["AP"] == 40.6 and summary["trials"][1]["precision"] == "amp"
    assert summary["mean"]["bbox"]["AP"] == pytest.approx(statistics.fmean([40.0, 40.6, 41.2]))
    assert summary["std"]["segm"]["AP"] == pytest.approx(statistics.stdev([36.0, 36.3, 36.9]))
    assert summary["mean"]["bbox"]["APl"] is None and summary["std"]["bbox"]["APl"] is None
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("COCO val2017 detection and instance segmentation (Mask R-CNN), 3 of 4 trials finished")
    assert "| trial | seed | box AP | box AP50 | box AP75 | box APs | box APm | box APl | mask AP | mask AP50 |" in md
    row = "| 0 | 0 | 40.00 | 60.00 | 42.00 | 30.00 | 40.00 | - | 36.00 | 56.00 | 38.00 | 26.00 | 36.00 | - | amp |"
    assert row in md
    assert format_trial_line(0, 4, m, COCO) == ("trial 1/4 (seed 0): box AP 40.00 AP50 60.00 AP75 42.00 | "
                                                "mask AP 36.00 AP50 56.00 AP75 38.00 [amp]")


def test_a_coco_trial_is_finished_only_with_box_and_mask(tmp_path):
    folder = trial_dir(tmp_path, 0)
    with pytest.raises(ValueError, match="segm"):
        write_metrics(folder, {"bbox": COCO.record(_coco_result(1, 1))["bbox"]}, seed=0, benchmark=COCO)
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"bbox": {k: 1.0 for k in KEYS}, "seed": 0}))
    assert trial_state(folder, COCO) is TrialState.NEW
    write_metrics(folder, COCO.record(_coco_result(1, 1)), seed=0, benchmark=COCO)
    assert trial_state(folder, COCO) is TrialState.FINISHED


def test_voc_keeps_its_flat_layout_and_names_itself(tmp_path):
    write_metrics(trial_dir(tmp_path, 0), VOC.record({"bbox": {"AP": 57.0, "AP50": 82.4, "AP75": 63.6}}), seed=0)
    assert set(read_metrics(trial_dir(tmp_path, 0))) == {"AP", "AP50", "AP75", "seed"}
    summary = summarize(tmp_path, 1)
    assert summary["benchmark"] == "voc" and summary["trials"][0]["AP50"] == 82.4 and summary["mean"]["AP"] == 57.0
    assert format_trial_line(0, 1, summary["trials"][0]) == "trial 1/1 (seed 0): AP50 82.40 AP 57.00 AP75 63.60"


def test_runbook_books_a_coco_trial_with_one_read_of_run_json(tmp_path, monkeypatch):
    update_run(tmp_path, benchmark="coco", config_sha256="x")
    lines = []
    book = RunBook(tmp_path, 1, {}, lines.append, benchmark=COCO)
    write_metrics(trial_dir(tmp_path, 0), COCO.record(_coco_result(40.0, 36.0)), seed=0, benchmark=COCO)
    from moco_transfer.eval.detection import trials

    reads = []
    real = trials.read_run
    monkeypatch.setattr(trials, "read_run", lambda out: reads.append(out) or real(out))
    assert book.finished(0)["segm"]["AP"] == 36.0
    assert len(reads) == 1  # the booking reads run.json once and writes it once
    run = read_run(tmp_path)
    assert run["config_sha256"] == "x" and run["trial_lines"]["0"]["bbox"]["AP"] == 40.0
    assert lines[-1].startswith("trial 1/1 (seed 0): box AP 40.00")


def test_specs():
    assert get_benchmark("coco") is COCO and COCO.default_trials == 1 and VOC.default_trials == 5
    with pytest.raises(KeyError, match="voc, coco"):
        get_benchmark("lvis")
    assert COCO.config_file("c4-2x") == "coco_R_50_C4_2x_moco.yaml" and COCO.config_file("mine.yaml") == "mine.yaml"
    assert COCO.dataset_name("coco_2017_val") == "moco_coco_2017_val" and VOC.dataset_name("coco_2017_val") == \
        "coco_2017_val"  # a VOC run leaves COCO names to detectron2's own registration
    assert our_name("voc_2007_test") == "moco_voc_2007_test"
    assert coco_names(["moco_coco_2017_train", "coco_2017_val", "voc_2007_test"]) == ["coco_2017_train",
                                                                                        "coco_2017_val"]
    rows = {(r.config, r.label): r.values for r in COCO.references}
    assert rows[("fpn-2x", "MoCo IN-1M")]["segm"] == {"AP": 36.9, "AP50": 58.4, "AP75": 39.7}
    assert rows[("c4-2x", "MoCo IN-1M")]["bbox"] == {"AP": 40.7, "AP50": 60.5, "AP75": 44.1}


NAMES = ["moco_coco_2017_train", "moco_coco_2017_val"]


def test_coco_layout_checks_name_each_problem(tmp_path):
    root = write_coco(tmp_path / "coco")
    assert check_coco_root(root, NAMES) == ({"coco_2017_train": 4, "coco_2017_val": 2}, 3)
    with pytest.raises(LayoutError, match="not a folder"):
        check_coco_root(tmp_path / "nowhere", NAMES)
    (root / "annotations" / "instances_train2017.json").rename(tmp_path / "moved.json")
    with pytest.raises(LayoutError) as err:
        check_coco_root(root, NAMES)
    assert f"coco_2017_train: missing {root / 'annotations' / 'instances_train2017.json'}" in str(err.value)
    assert "DIR/train2017/*.jpg" in str(err.value)  # the expected layout
    (tmp_path / "moved.json").rename(root / "annotations" / "instances_train2017.json")
    (root / "train2017" / "000000000002.jpg").unlink()
    (root / "val2017" / "000000001001.jpg").unlink()
    with pytest.raises(LayoutError) as err:
        check_coco_root(root, NAMES)
    assert "names 1 of 4 images that are not in" in str(err.value) and "000000000002.jpg" in str(err.value)
    assert "names 1 of 2 images" in str(err.value) and "000000001001.jpg" in str(err.value)  # both, in one go


def test_coco_annotation_files_must_be_coco_and_agree(tmp_path):
    root = write_coco(tmp_path / "coco")
    val = root / "annotations" / "instances_val2017.json"
    data = json.loads(val.read_text())
    data["categories"] = data["categories"][:2]
    val.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match="different categories \\(coco_2017_train: 3, coco_2017_val: 2\\)"):
        check_coco_root(root, NAMES)
    val.write_text("{not json")
    with pytest.raises(LayoutError, match="not valid JSON"):
        check_coco_root(root, NAMES)
    val.write_text(json.dumps({"images": []}))
    with pytest.raises(LayoutError, match="not a COCO instances file"):
        check_coco_root(root, NAMES)
