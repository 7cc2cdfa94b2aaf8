"""The real-data presets: `cifar10-demo` (the MoCo authors' CIFAR-10 demo) and `fashion-mnist` (sized for a 2-core
CPU), the `--blur/--no-blur` switch in both augmentation pipelines, and the demo preset end to end on a tiny
CIFAR-10 written here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_transfer.checkpoint import load_checkpoint
from moco_transfer.cli import main
from moco_transfer.named_sets import ArraySplit
from moco_transfer.pretrain import data as pretrain_data
from moco_transfer.pretrain.config import PRESETS, PretrainConfig, resolve_config
from moco_transfer.pretrain.engine import model_input

from . import named_set_files as files

CPU = torch.device("cpu")

# The demo notebook's arguments (facebookresearch/moco, colab/moco_cifar10_demo.ipynb) and its views.
CIFAR10_DEMO = {"data": "cifar10", "arch": "resnet18", "small_images": True, "image_size": 32, "batch_size": 512,
                "moco_k": 4096, "moco_m": 0.99, "moco_t": 0.1, "effective_lr": 0.06, "momentum": 0.9,
                "weight_decay": 5e-4, "cos": True, "epochs": 200, "bn_splits": 8, "mlp": False, "head_bn": False,
                "symmetric": False, "moco_dim": 128, "aug_plus": True, "crop_min": 0.08, "flip": True, "blur": False,
                "knn_every": 10, "knn_k": 200, "knn_t": 0.1, "output": "runs/cifar10-demo"}
# docs/real_data.md says why each of these is what it is.
FASHION_MNIST = {"data": "fashion-mnist", "arch": "resnet18", "small_images": True, "image_size": 28,
                 "head_bn": True, "mlp": True, "aug_plus": True, "blur": False, "output": "runs/fashion-mnist"}


def settings(cfg: PretrainConfig) -> dict[str, Any]:
    return {**cfg.to_dict(), "effective_lr": cfg.effective_lr}


@pytest.mark.parametrize(("preset", "expected"), [("cifar10-demo", CIFAR10_DEMO), ("fashion-mnist", FASHION_MNIST)])
def test_presets_resolve_with_the_documented_values(preset: str, expected: dict[str, Any]) -> None:
    got = settings(resolve_config(preset))
    assert {k: got[k] for k in expected} == expected
    assert got["preset"] == preset


def test_every_other_preset_keeps_the_blur() -> None:
    """aug+ with its blur stays the default: only the two real-data presets drop it."""
    assert PretrainConfig().blur is True
    for name in PRESETS:
        assert resolve_config(name).blur is (name not in ("cifar10-demo", "fashion-mnist")), name


def test_fashion_mnist_preset_matches_its_documentation() -> None:
    """Every value docs/real_data.md lists for the preset is the preset's."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "real_data.md").read_text()
    section = doc.split("<!-- fashion-mnist preset -->")[1].split("<!-- end -->")[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    documented = {name.strip().strip("`"): yaml.safe_load(value.strip().strip("`")) for name, value in rows}
    assert len(documented) >= 15
    got = settings(resolve_config("fashion-mnist"))
    assert {k: got[k] for k in documented} == documented


@pytest.mark.parametrize("args", [["--preset", "cifar10-demo"], ["--preset", "fashion-mnist", "--blur"],
                                  ["--preset", "mocov2", "--no-blur"], ["--preset", "cifar10-demo", "--blur"]])
def test_cli_takes_the_presets_and_the_blur_switch(args: list[str], monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    seen: list[PretrainConfig] = []
    monkeypatch.setattr("moco_transfer.pretrain.engine.run_pretraining",
                        lambda cfg, resume=None, force=False: seen.append(cfg))
    result = CliRunner().invoke(main, ["pretrain", *args, "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.preset == args[1]
    expected_blur = {"--blur": True, "--no-blur": False}.get(args[-1], args[1] != "cifar10-demo")
    assert cfg.blur is expected_blur


# ---------------------------------------------------------------------------------------------- blur


SIDE = 224  # the blur's sigma scales with the view (0.1-2 px at 224 px; at most 0.29 px at 32 px)
LOW, HIGH = 110, 146  # a checkerboard of one-pixel squares; aug+'s jitter never clamps these


def checkerboards(n: int) -> ArraySplit:
    board = np.where((np.arange(SIDE)[:, None] + np.arange(SIDE)[None, :]) % 2 == 0, LOW, HIGH).astype(np.uint8)
    images = np.broadcast_to(board, (n, 3, SIDE, SIDE)).copy()
    return ArraySplit("cifar10", "pretrain", images, np.zeros(n, np.int64), ["0"], Path("<checkerboards>"))


def sharpness(pipeline: str, blur: bool | None, monkeypatch: pytest.MonkeyPatch, n: int = 64) -> torch.Tensor:
    """Per view (both views of n checkerboards from the cifar10-demo preset's loader, built as `moco pretrain`
    builds it): the mean |pixel - mean of its 4 neighbours| over the mean brightness.

    A sharp checkerboard gives (HIGH - LOW) / mean = 0.28; aug+'s contrast scales it by 0.6-1.4 and nothing else
    in aug+ changes it (brightness scales both; hue, saturation and grayscale leave gray alone; the flip moves
    the squares by one pixel). A blur with sigma > 0.7 px takes more than 90% of it away. Crops are whole images
    (crop_min 1), so the views are not resized.
    """
    cfg = resolve_config("cifar10-demo", overrides={"blur": blur, "image_size": SIDE, "crop_min": 1.0,
                                                    "batch_size": n, "workers": 0, "data_pipeline": pipeline,
                                                    "output": "unused"})
    monkeypatch.setattr(pretrain_data, "load_named_split", lambda *args, **kwargs: checkerboards(n))
    loader = pretrain_data.build_pretrain_loader(cfg, pretrain_data.build_pretrain_dataset(cfg, CPU), CPU)
    pretrain_data.seed_epoch(loader, cfg.seed, 0)
    views = model_input(torch.cat([torch.cat(list(pair)) for pair, _, _ in loader]), CPU,
                        torch.contiguous_format)  # what the step sees: the CPU path's uint8 views normalised
    assert views.shape == (2 * n, 3, SIDE, SIDE)
    gray = (views * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    gray = gray.mean(dim=1) * 255
    centre = gray[:, 1:-1, 1:-1]
    around = (gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:]) / 4
    inner = (slice(None), slice(8, -8), slice(8, -8))  # away from the edges, which blur differently
    return (centre - around).abs()[inner].mean(dim=(1, 2)) / centre[inner].mean(dim=(1, 2))


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_no_blur_keeps_every_view_sharp(pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The preset's --no-blur: every view keeps the checkerboard (contrast alone: 0.17-0.39); with --blur, as
    aug+ has it, about a third of the views (p 0.5, sigma > 0.7 px in 68% of blurs) lose nearly all of it."""
    sharp = sharpness(pipeline, None, monkeypatch)
    assert sharp.min() > 0.14, sharp.min()
    blurred = sharpness(pipeline, True, monkeypatch)
    lost = (blurred < 0.06).float().mean()
    assert 0.15 < lost < 0.55, lost
    assert (blurred > 0.14).float().mean() > 0.4  # the unblurred half is as sharp as without the switch


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_cifar10_demo_preset_runs_end_to_end(tmp_path: Path) -> None:
    """`moco pretrain --preset cifar10-demo` on a tiny CIFAR-10 in its real format, with tiny epochs, batch and
    queue; the rest is the preset's: fc head, no blur, T 0.1, the kNN monitor (T 0.1) on the test split."""
    files.write_cifar10(tmp_path / "data", per_batch=4, test=6)  # 20 training images
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["pretrain", "--preset", "cifar10-demo", "--data-root", str(tmp_path / "data"),
                                       "-o", str(out), "--epochs", "1", "--batch-size", "16", "--moco-k", "32",
                                       "--workers", "0", "--knn-every", "1", "--knn-k", "5"])
    assert result.exit_code == 0, result.output
    assert "batch 16" in result.output and "lr 0.06," in result.output and "fc head" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert {k: saved[k] for k in ("preset", "data", "blur", "mlp", "moco_t", "knn_t", "bn_splits", "crop_min")} == {
        "preset": "cifar10-demo", "data": "cifar10", "blur": False, "mlp": False, "moco_t": 0.1, "knn_t": 0.1,
        "bn_splits": 8, "crop_min": 0.08}
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert record["epoch"] == 1 and 0.0 <= record["knn_top1"] <= 100.0
    state = load_checkpoint(out / "checkpoint_0000.pth.tar")["state_dict"]
    heads = {k: tuple(v.shape) for k, v in state.items() if ".fc." in k}
    assert heads == {"module.encoder_q.fc.weight": (128, 512), "module.encoder_q.fc.bias": (128,),
                     "module.encoder_k.fc.weight": (128, 512), "module.encoder_k.fc.bias": (128,)}
