"""End to end with a real detectron2: `moco eval voc` fine-tunes on a synthetic VOC tree for a few iterations.

The overrides in `voc_synthetic.TINY` keep every trial to CPU seconds.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
from click.testing import CliRunner

from .voc_synthetic import TINY, single_torch_thread, write_moco_checkpoint, write_voc  # noqa: F401

pytest.importorskip("detectron2", reason="detectron2 not installed (no wheel for this Python; build it from "
                                         "source as docs/voc.md says)")

from moco_transfer.cli import main  # noqa: E402


def _run(args):
    return CliRunner().invoke(main, ["eval", "voc", *args], catch_exceptions=False)


def test_trials_summary_skip_and_resume(moco_checkpoint, voc_root, tmp_path):
    out = tmp_path / "run"
    args = [str(moco_checkpoint), "--voc-root", str(voc_root), "--output", str(out), "--trials", "2", "--gpus", "0",
            "--opts", *TINY]
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "all 318 backbone/res5 tensors load into the model" in res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_finished"] == 2
    assert [(r["trial"], r["seed"]) for r in summary["trials"]] == [(0, 0), (1, 1)]
    for row in summary["trials"]:
        for key in ("AP", "AP50", "AP75"):
            assert row[key] is not None and 0.0 <= row[key] <= 100.0
    for key in ("AP", "AP50", "AP75"):
        vals = [r[key] for r in summary["trials"]]
        assert summary["mean"][key] == pytest.approx(sum(vals) / 2)
        assert summary["std"][key] == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
    assert "| mean |" in (out / "summary.md").read_text()
    assert [r["precision"] for r in summary["trials"]] == ["fp32", "fp32"]
    assert "memory pre-flight: skipped on the CPU" in res.output
    for k in (0, 1):
        trial = out / f"trial_{k}"
        assert (trial / "model_final.pth").is_file() and (trial / "log.txt").is_file()
        cfg_text = (trial / "config.yaml").read_text()
        assert f"SEED: {k}\n" in cfg_text and "moco_voc_2007_trainval" in cfg_text and "backbone_d2.pkl" in cfg_text
        metrics = json.loads((trial / "metrics.json").read_text())
        assert metrics["start_iter"] == 0 and metrics["amp"] is False and metrics["ims_per_gpu"] == 2
        progress = json.loads((trial / "progress.json").read_text())
        assert progress["iteration"] == 4 and progress["window"] == [2, 4] and progress["s_per_iter"] > 0
        assert len((trial / "train_log.json").read_text().splitlines()) >= 1  # detectron2's JSON lines
        line = f"trial {k + 1}/2 (seed {k}): AP50 {summary['trials'][k]['AP50']:.2f}"
        assert line in res.output
    run = json.loads((out / "run.json").read_text())
    assert run["version"] == 2 and run["config"]["SOLVER.BASE_LR"] == 0.002
    assert "SOLVER.AMP.ENABLED" not in run["config"] and run["execution"]["amp"] is False
    assert sorted(run["trial_lines"]) == ["0", "1"] and run["trial_lines"]["1"]["line"].startswith("trial 2/2")
    proj = run["projection"]  # from the first trial's timed iterations 2-4: 2 trials x 4 iterations
    assert proj["iterations"] == [4, 4] and proj["parallel"] == 1 and proj["trial"] == 0
    assert proj["seconds"] == pytest.approx(8 * proj["s_per_iter"])
    assert proj["line"] in res.output

    # Interrupt trial 1 after its first checkpoint (iteration 2 of 4); trial 0 stays finished.
    t0_metrics = (out / "trial_0" / "metrics.json").read_text()
    t1 = out / "trial_1"
    for name in ("metrics.json", "model_final.pth", "model_0000003.pth"):
        (t1 / name).unlink()
    (t1 / "last_checkpoint").write_text("model_0000001.pth")
    res = _run(args)
    assert res.exit_code == 0, res.output
    assert "trial 1/2 (seed 0): finished earlier" in res.output
    assert "trial 2/2 (seed 1): resuming from its last checkpoint" in res.output
    assert (out / "trial_0" / "metrics.json").read_text() == t0_metrics
    assert json.loads((t1 / "metrics.json").read_text())["start_iter"] == 2
    assert (t1 / "model_final.pth").is_file()
    assert json.loads((out / "summary.json").read_text())["trials_finished"] == 2

    # A third run has nothing to do, and a changed training target is refused for this folder, naming the change.
    res = _run(args)
    assert res.exit_code == 0 and "resuming" not in res.output and res.output.count("finished earlier") == 2
    assert len(json.loads((out / "run.json").read_text())["history"]) == 3
    res = _run([*args, "SOLVER.BASE_LR", "0.01"])
    assert res.exit_code != 0 and "2 finished trial(s) (0, 1)" in res.output
    assert "SOLVER.BASE_LR 0.002 -> 0.01" in res.output and "--fresh" in res.output
    assert "Traceback" not in res.output


def test_preflight_errors_before_training(moco_checkpoint, voc_root, tmp_path):
    # VOC folders missing
    res = _run([str(moco_checkpoint), "--voc-root", str(tmp_path / "empty"), "--output", str(tmp_path / "a"),
                "--gpus", "0", "--opts", *TINY])
    assert res.exit_code != 0 and "DIR/VOC2007/ImageSets/Main/trainval.txt" in res.output
    # detectron2 weights lacking res5 tensors: named, and no trial starts
    from moco_transfer.convert import convert

    full = tmp_path / "full.pkl"
    convert(moco_checkpoint, full)
    with open(full, "rb") as f:
        payload = pickle.load(f)  # written by this test
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("res5.2.")}
    broken = tmp_path / "broken.pkl"
    with open(broken, "wb") as f:
        pickle.dump(payload, f)
    out = tmp_path / "b"
    res = _run([str(broken), "--voc-root", str(voc_root), "--output", str(out), "--gpus", "0", "--opts", *TINY])
    assert res.exit_code != 0
    assert "missing (e.g." in res.output and "res5.2.conv1.weight" in res.output
    assert not (out / "trial_0").exists() and not (out / "run.json").exists()  # a fixed checkpoint can retry here
    # --amp needs CUDA: said before anything runs
    res = _run([str(full), "--voc-root", str(voc_root), "--output", str(tmp_path / "d"), "--gpus", "0", "--amp",
                "--opts", *TINY])
    assert res.exit_code != 0 and "--amp (SOLVER.AMP.ENABLED) needs CUDA GPUs" in res.output
    assert not (tmp_path / "d" / "run.json").exists()
    # a wrong config key is reported by detectron2's own check
    res = _run([str(full), "--voc-root", str(voc_root), "--output", str(tmp_path / "c"), "--gpus", "0",
                "--opts", "SOLVER.NOT_A_KEY", "1"])
    assert res.exit_code != 0 and "SOLVER.NOT_A_KEY" in res.output
