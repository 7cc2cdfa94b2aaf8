"""`moco eval coco` end to end with a real detectron2 on the CPU: a tiny COCO-format set, Mask R-CNN C4 and FPN,
box and mask AP from COCOEvaluator, skip on re-run, and the dataset checks' messages.

Skipped without detectron2 (build it from source: docs/voc.md, "Installing detectron2").
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from .coco_synthetic import TINY_COCO, write_coco
from .voc_synthetic import TINY, single_torch_thread, write_moco_checkpoint  # noqa: F401

pytest.importorskip("detectron2", reason="detectron2 not installed (no wheel for this Python; build it from "
                                         "source as docs/voc.md says)")

from moco_transfer.cli import main  # noqa: E402

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco"))


def _run(args):
    return CliRunner().invoke(main, ["eval", "coco", *args], catch_exceptions=False)


def _args(ckpt, root, out, config, trials="2"):
    return [str(ckpt), "--coco-root", str(root), "--output", str(out), "--config", config, "--trials", trials,
            "--gpus", "0", "--opts", *TINY, *TINY_COCO]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["c4-1x", "fpn-1x"])
def test_two_trials_give_box_and_mask_ap_and_a_rerun_skips_them(config, moco_checkpoint, coco_root, tmp_path,
                                                                monkeypatch):
    out = tmp_path / "run"
    res = _run(_args(moco_checkpoint, coco_root, out, config))
    assert res.exit_code == 0, res.output
    assert "COCO datasets: moco_coco_2017_train (4 images), moco_coco_2017_val (2 images)" in res.output
    tensors = "318 backbone/res5" if config.startswith("c4") else "318 backbone"
    assert f"all {tensors} tensors load into the model" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "coco" and summary["trials_finished"] == 2
    assert [(r["trial"], r["seed"]) for r in summary["trials"]] == [(0, 0), (1, 1)]
    for task in ("bbox", "segm"):
        rows = [r[task] for r in summary["trials"]]
        for row in rows:
            assert set(row) == set(KEYS)
            assert all(row[k] is None or 0.0 <= row[k] <= 100.0 for k in KEYS)
            assert row["AP"] is not None and row["AP50"] is not None
        for key in KEYS:
            vals = [r[key] for r in rows if r[key] is not None]
            if len(vals) == 2:
                assert summary["mean"][task][key] == pytest.approx(sum(vals) / 2)
                assert summary["std"][task][key] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    for k in (0, 1):
        metrics = json.loads((out / f"trial_{k}" / "metrics.json").read_text())
        assert set(metrics["bbox"]) == set(KEYS) and set(metrics["segm"]) == set(KEYS) and metrics["seed"] == k
        assert "AP" not in metrics  # COCO's layout: one dict per task, nothing flat
        cfg_text = (out / f"trial_{k}" / "config.yaml").read_text()
        assert "moco_coco_2017_train" in cfg_text and "MASK_ON: true" in cfg_text
        box, mask = summary["trials"][k]["bbox"], summary["trials"][k]["segm"]
        line = (f"trial {k + 1}/2 (seed {k}): box AP {box['AP']:.2f} AP50 {box['AP50']:.2f} AP75 "
                f"{'-' if box['AP75'] is None else format(box['AP75'], '.2f')} | mask AP {mask['AP']:.2f}")
        assert line in res.output
    md = (out / "summary.md").read_text()
    assert md.startswith("COCO val2017 detection and instance segmentation (Mask R-CNN), 2 of 2 trials finished")
    assert "| trial | seed | box AP | box AP50 | box AP75 | box APs | box APm | box APl | mask AP |" in md
    run = json.loads((out / "run.json").read_text())
    assert run["benchmark"] == "coco" and sorted(run["trial_lines"]) == ["0", "1"]
    assert run["trial_lines"]["0"]["segm"]["AP"] == summary["trials"][0]["segm"]["AP"]
    assert f"2 trials: box AP {summary['mean']['bbox']['AP']:.2f} +- " in res.output

    # The same command again: both trials finished, nothing trains, the summary stays; each trial folder's state
    # is taken once for the whole start-up (run record, memory pre-flight, skip).
    from moco_transfer.eval.detection import trials

    looked, real = [], trials.trial_state
    monkeypatch.setattr(trials, "trial_state", lambda folder, bm: looked.append(folder) or real(folder, bm))
    before = (out / "summary.json").read_text()
    res = _run(_args(moco_checkpoint, coco_root, out, config))
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in looked) == ["trial_0", "trial_1"]
    assert res.output.count("finished earlier (box AP ") == 2 and "starting" not in res.output
    assert json.loads((out / "summary.json").read_text()) == json.loads(before)


def test_dataset_errors_name_the_file(moco_checkpoint, coco_root, tmp_path):
    # a folder that is not in detectron2's layout: the missing annotation files are named, with the layout
    res = _run(_args(moco_checkpoint, tmp_path / "empty_root_parent", tmp_path / "a", "fpn-1x", "1"))
    assert res.exit_code != 0 and "--coco-root" in res.output and "not a folder" in res.output
    wrong = tmp_path / "wrong"
    (wrong / "images").mkdir(parents=True)
    res = _run(_args(moco_checkpoint, wrong, tmp_path / "b", "fpn-1x", "1"))
    assert res.exit_code != 0
    assert f"missing {wrong / 'annotations' / 'instances_train2017.json'}, {wrong / 'train2017'}" in res.output
    assert "DIR/annotations/instances_val2017.json" in res.output and "Traceback" not in res.output
    # an annotation file that names an image the image folder lacks
    broken = write_coco(tmp_path / "broken")
    (broken / "val2017" / "000000001002.jpg").unlink()
    res = _run(_args(moco_checkpoint, broken, tmp_path / "c", "c4-1x", "1"))
    assert res.exit_code != 0
    assert (f"{broken / 'annotations' / 'instances_val2017.json'} names 1 of 2 images that are not in "
            f"{broken / 'val2017'} (e.g. 000000001002.jpg)") in res.output
    assert not (tmp_path / "c").exists()  # nothing written for a run that cannot start
    # a classifier that does not fit the annotation files' categories
    res = _run([str(moco_checkpoint), "--coco-root", str(coco_root), "--output", str(tmp_path / "d"), "--gpus", "0",
                "--opts", *TINY])
    assert res.exit_code != 0
    assert "the annotation files have 3 categories but the config's MODEL.ROI_HEADS.NUM_CLASSES is 80" in res.output
    # an unknown --config choice lists the choices
    res = _run(_args(moco_checkpoint, coco_root, tmp_path / "e", "fpn-3x", "1"))
    assert res.exit_code != 0 and "c4-1x, c4-2x, fpn-1x, fpn-2x" in res.output
