"""Shared fixtures: small image folders, a MoCo checkpoint and a VOC tree written by the tests themselves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from . import voc_synthetic

GPU_REPORT: dict[str, object] = {}


def write_class_folders(root: Path, classes: int = 2, per_class: int = 16, size: int = 24, seed: int = 0) -> Path:
    """Images whose class is a colour-and-stripe pattern, so features can separate them."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.zeros((size, size, 3), dtype=np.float32)
            base[..., c % 3] = 200
            base[:: 2 + c, :, :] = 40
            noise = rng.normal(0, 25, size=(size, size, 3))
            img = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return root


FIRST = ("test_readme_default.py",)  # the longest test: under `pytest -n 2` it runs beside all the others


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker takes its share of the cores, and so do the commands its tests start: N
    workers with all the cores' threads each would thrash them (4x slower on 2 cores)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // int(workers))
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest test first (workers take files in this order: `--dist loadfile --no-loadscope-reorder`);
    tests marked `cuda` skip where no CUDA device is visible (CI); `pytest -m cuda` runs them on a GPU."""
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA); run with `python -m pytest -m cuda` on one")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gpu_report() -> dict[str, object]:
    """Figures of the `cuda` tests, written at the end of the session to $MOCO_GPU_CHECK_JSON (gpu_check.sh)."""
    yield GPU_REPORT
    path = os.environ.get("MOCO_GPU_CHECK_JSON")
    if path and GPU_REPORT:
        Path(path).write_text(json.dumps(GPU_REPORT, indent=2, default=str))


@pytest.fixture
def one_thread():
    """In-process training on one torch thread: beside a producer thread or loader workers, two intra-op threads
    thrash 2 cores (4x slower here). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with 2 classes: 16 + 8 images per class, 24 px."""
    root = tmp_path_factory.mktemp("tiny")
    write_class_folders(root / "train", per_class=16, seed=0)
    write_class_folders(root / "val", per_class=8, seed=1)
    return root


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory):
    """A random-weights MoCo v2 ResNet-50 checkpoint, shared by the tests of one module."""
    return voc_synthetic.write_moco_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_0000.pth.tar")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return voc_synthetic.write_voc(tmp_path_factory.mktemp("VOCdevkit"))
