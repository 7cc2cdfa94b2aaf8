"""The device data pipeline (--data-pipeline gpu) on CPU tensors: bytes loading, decode fallbacks, the skip rule,
full batches, training dtype/layout, per-epoch determinism and resume after SIGKILL."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from moco_transfer.pretrain.config import ConfigError, resolve_config
from moco_transfer.pretrain.data import build_pretrain_dataset, build_pretrain_loader, seed_epoch
from moco_transfer.pretrain.gpu_pipeline import (
    DevicePipeline,
    ImageBytesDataset,
    TensorImages,
    collate_raw,
    device_decodable,
    resolve_pipeline,
)

from .test_pretrain_engine import kill_and_resume_matches_straight_run

CPU = torch.device("cpu")
TINY = dict(arch="resnet18", small_images=True, image_size=16, batch_size=8, moco_k=32, bn_splits=2,
            workers=0, epochs=2, moco_m=0.99, data_pipeline="gpu")


def _array(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    return np.clip(ramp + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(array: np.ndarray, mode: str = "RGB", **save: object) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, "JPEG", **save)
    return out.getvalue()


def write_jpeg_folders(root: Path, classes: int = 2, per_class: int = 12) -> Path:
    """JPEGs of varying size (the device-decoded kind), plus a PNG and a grayscale JPEG for the CPU path.

    class_0 holds extra.png; the last class folder holds gray.jpg (with one class: class_0, in that order).
    """
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / f"img_{i:03d}.jpg").write_bytes(_jpeg(_array(20 + 3 * i, 28 - i, seed=100 * c + i)))
    Image.fromarray(_array(24, 24, seed=7)).save(root / "class_0" / "extra.png")
    (root / f"class_{classes - 1}" / "gray.jpg").write_bytes(_jpeg(_array(22, 26, seed=8), mode="L"))
    return root


def test_which_jpegs_go_to_the_device_decoder():
    rgb = _array(30, 40, 0)
    assert device_decodable(_jpeg(rgb))
    assert not device_decodable(_jpeg(rgb, progressive=True))  # nvjpeg: one by one with host syncs
    assert not device_decodable(_jpeg(rgb, mode="L"))      # grayscale: decoded on the CPU
    assert not device_decodable(_jpeg(rgb, mode="CMYK"))   # 4 components
    good = _jpeg(rgb)
    assert not device_decodable(good[: len(good) // 2])    # truncated: no end-of-image marker
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    assert not device_decodable(png.getvalue())
    assert not device_decodable(b"") and not device_decodable(b"\xff\xd8\xff\xd9")


def test_bytes_dataset_reads_bytes_decodes_others_and_skips_unreadable(tmp_path):
    root = write_jpeg_folders(tmp_path, classes=1, per_class=3)
    (root / "class_0" / "img_001.jpg").write_bytes(b"\x89PNG broken")  # not a JPEG, and unreadable
    ds = ImageBytesDataset(root)
    names = [Path(p).name for p, _ in ds.samples]
    assert names == ["extra.png", "gray.jpg", "img_000.jpg", "img_001.jpg", "img_002.jpg"]
    data, target, bad, index = ds[2]
    assert data.dim() == 1 and bytes(data.numpy()) == (root / "class_0" / "img_000.jpg").read_bytes()
    assert (target, bad, index) == (0, (), 2)
    for i, name in ((0, "extra.png"), (1, "gray.jpg")):  # decoded in the worker, as the CPU pipeline would
        decoded, _, _, _ = ds[i]
        assert torch.equal(decoded, pil_to_tensor(Image.open(root / "class_0" / name).convert("RGB")))
    data, _, bad, index = ds[3]  # the broken file is replaced by the next readable one, and reported
    assert index == 4 and bytes(data.numpy()) == (root / "class_0" / "img_002.jpg").read_bytes()
    assert len(bad) == 1 and "img_001.jpg" in bad[0]


def test_decode_matches_pil_and_replaces_what_no_decoder_reads(tmp_path):
    root = write_jpeg_folders(tmp_path, classes=1, per_class=4)
    good = _jpeg(_array(30, 30, 1))
    sos = good.index(b"\xff\xda")
    # Looks decodable (frame header, end marker) but has no scan: fails on the device and on the CPU.
    (root / "class_0" / "img_002.jpg").write_bytes(good[:sos] + b"\xff\xd9")
    ds = ImageBytesDataset(root)
    pipeline = DevicePipeline(torch.utils.data.DataLoader(ds, batch_size=6, collate_fn=collate_raw), None, CPU)
    payload, layout, targets, bad = next(iter(pipeline.loader))
    assert layout[:, 1].tolist() == [3, 3, 0, 0, 0, 0]  # PNG and grayscale decoded in the worker, JPEGs as bytes
    images, more_bad = pipeline.decode(payload, layout)
    assert len(images) == 6 and bad == []
    assert len(more_bad) == 1 and "img_002.jpg" in more_bad[0] and "PIL" in more_bad[0]
    names = [Path(p).name for p, _ in ds.samples]
    expected = names[:4] + ["img_003.jpg"] + names[5:]  # img_002 replaced by the next readable file
    for image, name in zip(images, expected, strict=True):
        ref = pil_to_tensor(Image.open(root / "class_0" / name).convert("RGB"))
        assert image.dtype == torch.uint8 and image.shape == ref.shape
        # libjpeg-turbo in torchvision and in PIL may use different IDCT/upsampling: within a few levels
        assert (image.int() - ref.int()).abs().float().mean() < 2.0, name


def test_loader_gives_full_batches_in_the_training_dtype_and_layout(tmp_path):
    data = write_jpeg_folders(tmp_path / "data")
    (data / "class_1" / "img_005.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt \xff\xd9")
    cfg = resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(tmp_path / "out"),
                                              "amp": "bf16", "channels_last": True})
    dataset = build_pretrain_dataset(cfg, CPU)
    assert isinstance(dataset, ImageBytesDataset)
    loader = build_pretrain_loader(cfg, dataset, CPU)
    assert isinstance(loader, DevicePipeline) and len(loader) == len(dataset) // 8
    seed_epoch(loader, cfg.seed, 0)
    skipped = []
    for views, targets, bad in loader:
        skipped += bad
        assert len(views) == 2 and targets.shape == (8,)
        for v in views:
            assert v.shape == (8, 3, 16, 16) and v.dtype == torch.bfloat16
            assert v.is_contiguous(memory_format=torch.channels_last)
        assert not torch.equal(views[0], views[1])  # two independent draws
    assert len(skipped) >= 1 and all("img_005.jpg" in s for s in skipped)


def test_each_epoch_draws_the_same_views_however_it_is_reached(tmp_path):
    data = write_jpeg_folders(tmp_path / "data")
    cfg = resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(tmp_path / "out")})
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, CPU), CPU)

    def first_batch(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        seed_epoch(loader, cfg.seed, epoch)
        views, targets, _ = next(iter(loader))
        return torch.cat(views), targets

    a0, t0 = first_batch(0)
    a1, _ = first_batch(1)
    b0, u0 = first_batch(0)
    assert torch.equal(a0, b0) and torch.equal(t0, u0)
    assert not torch.equal(a0, a1)


def test_embedded_set_goes_through_the_device_pipeline_as_uint8_images(tmp_path):
    cfg = resolve_config("digits", overrides={"data_pipeline": "gpu", "workers": 0, "output": str(tmp_path)})
    dataset = build_pretrain_dataset(cfg, CPU)
    assert isinstance(dataset, TensorImages)
    image, target, bad, _ = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, cfg.image_size, cfg.image_size) and bad == ()
    loader = build_pretrain_loader(cfg, dataset, CPU)
    seed_epoch(loader, cfg.seed, 0)
    views, targets, bad = next(iter(loader))
    assert views[0].shape == (cfg.batch_size, 3, cfg.image_size, cfg.image_size) and views[0].dtype == torch.float32
    assert bad == [] and targets.shape == (cfg.batch_size,)


def test_pipeline_choice():
    cfg = resolve_config("mocov2", overrides={"data": "x"})
    assert cfg.data_pipeline == "auto"
    assert resolve_pipeline(cfg, CPU) == "cpu" and resolve_pipeline(cfg, torch.device("cuda")) == "gpu"
    cfg.data_pipeline = "gpu"
    assert resolve_pipeline(cfg, CPU) == "gpu"
    with pytest.raises(ConfigError, match="--data-pipeline 'nvidia': expected auto, cpu or gpu"):
        resolve_config("mocov2", overrides={"data": "x", "data_pipeline": "nvidia"})
    with pytest.raises(ConfigError, match="--log-every -1.0"):
        resolve_config("mocov2", overrides={"data": "x", "log_every": -1.0})


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_on_the_device_pipeline(tmp_path):
    data = write_jpeg_folders(tmp_path / "data", classes=2, per_class=23)  # 48 files: 6 steps per epoch
    done = kill_and_resume_matches_straight_run(data, tmp_path, "--data-pipeline", "gpu", "--log-every", "0.05")
    # Output to a pipe is not a terminal: plain progress lines, no carriage-return redraws.
    assert "\r" not in done.stdout + done.stderr
    assert "epoch 1/4: " in done.stderr and '"epoch": 4' in done.stdout
