"""`moco pretrain` end to end through click, and its error messages."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner
from PIL import Image

from moco_transfer.checkpoint import load_checkpoint
from moco_transfer.cli import main

from .test_pretrain_engine import _tiny_args


def test_pretrain_cli_end_to_end_with_config_file(tiny_folder, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"knn_every": 1, "knn_k": 5, "print_baseline": True}))
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["pretrain", "--config", str(cfg_file), *_tiny_args(tiny_folder, out, 1)])
    assert result.exit_code == 0, result.output
    assert "pretrained" in result.output and "random weights" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["knn_every"] == 1 and saved["moco_k"] == 32 and saved["preset"] == "mocov2"
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and "knn_top1" in record
    assert load_checkpoint(out / "checkpoint_0000.pth.tar")["config"]["seed"] == 3
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["knn_top1"] == record["knn_top1"] and 0.0 <= summary["knn_top1_random_init"] <= 100.0
    assert (summary["knn_k"], summary["knn_t"]) == (5, 0.07) and summary["checkpoint"].endswith("0000.pth.tar")
    assert f"random weights {summary['knn_top1_random_init']:.2f}%" in result.output
    curves = out / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(curves) in result.output
    assert Image.open(curves).size == (900, 600)


def test_pretrain_cli_bad_inputs(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["pretrain", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "folder not found" in missing.output
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(main, ["pretrain", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert empty.exit_code == 2 and "no class subfolders" in empty.output
    queue = runner.invoke(main, ["pretrain", "--moco-k", "1000", "--batch-size", "256"])
    assert queue.exit_code == 2 and "--moco-k 1000 must be a multiple of --batch-size 256" in queue.output
    resume = runner.invoke(main, ["pretrain", "--resume", str(tmp_path / "none.pth.tar"), "-o", str(tmp_path / "o"),
                                  "--epochs", "1"])
    assert resume.exit_code == 2 and "file not found" in resume.output
