"""Tiny checkpoints and image folders for the evaluation tests (shared by test_features/knn/linear)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_transfer.backbone import build_resnet
from moco_transfer.builder import MoCo
from moco_transfer.checkpoint import with_module_prefix


def make_checkpoint(path: Path, image_size: int = 16, seed: int = 0, with_config: bool = True) -> Path:
    """A resnet18 small-stem MoCo v2 checkpoint in this project's layout (random weights)."""
    torch.manual_seed(seed)
    model = MoCo(partial(build_resnet, "resnet18", small_images=True), dim=128, K=256, mlp=True)
    ckpt = {"epoch": 1, "arch": "resnet18", "state_dict": with_module_prefix(model.state_dict())}
    if with_config:
        ckpt["config"] = {"arch": "resnet18", "small_images": True, "image_size": image_size, "mlp": True}
    torch.save(ckpt, path)
    return path


def make_image_folder(root: Path, classes: dict[str, list[str]] | None = None, per_class: int = 6,
                      size: int = 20, seed: int = 0) -> Path:
    """root/train and root/val with one folder per class; each class has its own colour so it is learnable."""
    rng = np.random.default_rng(seed)
    classes = classes or {"train": ["a", "b", "c"], "val": ["a", "b", "c"]}
    colours = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220), "d": (200, 200, 30)}
    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array(colours.get(name, (128, 128, 128)), dtype=np.float64)
                pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def same_linear_result(straight: Path, resumed: Path) -> None:
    """A resumed probe's two epochs and final figures equal the uninterrupted run's."""
    a = json.loads((straight / "linear.json").read_text())
    b = json.loads((resumed / "linear.json").read_text())
    assert [h["epoch"] for h in b["history"]] == [1, 2]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], abs=1e-6)
        assert (hb["top1"], hb["top5"]) == (ha["top1"], ha["top5"])
    assert b["final"] == a["final"] and b["backbone_unchanged"] is True
