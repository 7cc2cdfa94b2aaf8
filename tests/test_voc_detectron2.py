"""End to end with a real detectron2: `moco eval voc` fine-tunes on a synthetic VOC tree for a few iterations.

Tiny overrides keep it to CPU seconds: 64-pixel images, 16 sampled RoIs per image pooled to 8x8, 2 images per
batch, 4 iterations.
"""

from __future__ import annotations

import json
import math
import pickle
from functools import partial

import pytest
import torch
from click.testing import CliRunner

from .voc_synthetic import write_voc

pytest.importorskip("detectron2", reason="detectron2 not installed (no wheel for this Python; build it from "
                                         "source as docs/voc.md says)")

from moco_transfer.backbone import build_resnet  # noqa: E402
from moco_transfer.builder import MoCo  # noqa: E402
from moco_transfer.checkpoint import with_module_prefix  # noqa: E402
from moco_transfer.cli import main  # noqa: E402

TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16", "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "32",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "16", "TEST.DETECTIONS_PER_IMAGE", "20",
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", "8",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.002", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
    "SOLVER.WARMUP_ITERS", "1", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MoCo(partial(build_resnet, "resnet50"), dim=128, K=256, mlp=True)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0000.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": with_module_prefix(model.state_dict()),
                "optimizer": {}, "config": {}}, path)
    return path


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return write_voc(tmp_path_factory.mktemp("VOCdevkit"))


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
    for k in (0, 1):
        trial = out / f"trial_{k}"
        assert (trial / "model_final.pth").is_file() and (trial / "log.txt").is_file()
        cfg_text = (trial / "config.yaml").read_text()
        assert f"SEED: {k}\n" in cfg_text and "moco_voc_2007_trainval" in cfg_text and "backbone_d2.pkl" in cfg_text
        assert json.loads((trial / "metrics.json").read_text())["start_iter"] == 0

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

    # A third run has nothing to do, and a changed configuration is refused for this folder.
    res = _run(args)
    assert res.exit_code == 0 and "resuming" not in res.output and res.output.count("finished earlier") == 2
    res = _run([*args, "SOLVER.BASE_LR", "0.01"])
    assert res.exit_code != 0 and "different config_sha256" in res.output


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
    # a wrong config key is reported by detectron2's own check
    res = _run([str(full), "--voc-root", str(voc_root), "--output", str(tmp_path / "c"), "--gpus", "0",
                "--opts", "SOLVER.NOT_A_KEY", "1"])
    assert res.exit_code != 0 and "SOLVER.NOT_A_KEY" in res.output
