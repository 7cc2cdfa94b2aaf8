"""The device data pipeline (--data-pipeline gpu) on CPU tensors: bytes loading, decode fallbacks, the skip rule,
full batches, training dtype/layout, per-epoch determinism and resume after SIGKILL."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from moco_transfer.pretrain import device_decode, gpu_pipeline
from moco_transfer.pretrain.config import ConfigError, resolve_config
from moco_transfer.pretrain.data import build_pretrain_dataset, build_pretrain_loader, seed_epoch, start_epoch_at
from moco_transfer.pretrain.device_decode import DeviceDecoder
from moco_transfer.pretrain.gpu_pipeline import (
    DevicePipeline,
    ImageBytesDataset,
    TensorImages,
    collate_raw,
    device_decodable,
    pipeline_choice,
    resolve_pipeline,
)

CPU = torch.device("cpu")
_REAL_DECODE = device_decode.jpeg_decoder()
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


def test_pipeline_choice_follows_the_self_check_on_a_gpu(monkeypatch):
    cfg = resolve_config("mocov2", overrides={"data": "x"})
    assert cfg.data_pipeline == "auto"
    assert resolve_pipeline(cfg, CPU) == "cpu"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(gpu_pipeline, "device_problem", lambda device: None)
    assert pipeline_choice(cfg, cuda) == ("gpu", "")
    monkeypatch.setattr(gpu_pipeline, "device_problem", lambda device: "the race canary found 2 tensors overwritten")
    name, reason = pipeline_choice(cfg, cuda)
    assert name == "cpu" and reason == ("--data-pipeline auto took the CPU pipeline: the race canary found 2 "
                                        "tensors overwritten")
    cfg.data_pipeline = "gpu"
    with pytest.raises(ConfigError, match="^--data-pipeline gpu: the race canary found 2 tensors overwritten$"):
        pipeline_choice(cfg, cuda)
    assert resolve_pipeline(cfg, CPU) == "gpu"  # CPU tensors (tests, CI): no self-check
    with pytest.raises(ConfigError, match="--data-pipeline 'nvidia': expected auto, cpu or gpu"):
        resolve_config("mocov2", overrides={"data": "x", "data_pipeline": "nvidia"})
    with pytest.raises(ConfigError, match="--log-every -1.0"):
        resolve_config("mocov2", overrides={"data": "x", "log_every": -1.0})


def test_rocm_gets_the_cpu_pipeline_without_a_self_check(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.1")
    monkeypatch.setattr("moco_transfer.pretrain.device_check.self_check", _must_not_run)
    problem = gpu_pipeline.device_problem(torch.device("cuda", 0))
    assert problem.startswith("cuda:0 is a ROCm device (HIP 6.4.1)")
    cfg = resolve_config("mocov2", overrides={"data": "x"})
    assert pipeline_choice(cfg, torch.device("cuda", 0)).name == "cpu"


def _must_not_run(*args: object) -> None:
    raise AssertionError("the self-check ran")


class _RecordingDecode:
    """decode_jpeg as torchvision runs it on the CPU, with a log of calls; files holding `refuse` fail."""

    def __init__(self, log: list, refuse: bytes = b"REFUSE-ME") -> None:
        self.log, self.refuse = log, refuse

    def __call__(self, data, mode=None, device=None):  # noqa: ANN001, ANN204 - decode_jpeg's signature
        ok = not any(self.refuse in bytes(d.numpy()) for d in data)
        self.log.append(("decode", len(data), ok))
        if not ok:
            raise RuntimeError("Error while decoding JPEG images: Failed to get image info: 3")
        return _REAL_DECODE(data, device=device)


def _with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same image with a COM segment after SOI: libjpeg and PIL read it as before."""
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def test_decoder_waits_for_its_stream_before_every_decode_call(monkeypatch):
    log: list = []

    class Stream:
        def synchronize(self) -> None:
            log.append(("fence",))

    decoder = DeviceDecoder(CPU)
    decoder.stream = Stream()
    monkeypatch.setattr(decoder, "on_stream", contextlib.nullcontext)
    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: _RecordingDecode(log))
    files = [_jpeg(_array(20, 24, i)) for i in range(8)]
    files[5] = _with_comment(files[5], b"REFUSE-ME")
    decoder.decode([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files])
    calls = [i for i, entry in enumerate(log) if entry[0] == "decode"]
    assert len(calls) > 1 and all(log[i - 1] == ("fence",) for i in calls)


def test_one_bad_file_costs_a_few_batched_calls_and_each_good_file_is_decoded_once(monkeypatch):
    log: list = []
    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: _RecordingDecode(log))
    files = [_jpeg(_array(20 + i, 24, i)) for i in range(16)]
    files[11] = _with_comment(files[11], b"REFUSE-ME")
    images, refused = DeviceDecoder(CPU).decode([torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files])
    # 16 fails; then halves, each decoded in one call: 8 ok, 8 fails; 4 ok, 4 fails; 2 ok, 2 fails; 1 ok, 1 fails
    assert sorted(n for _, n, _ in log) == [1, 1, 2, 2, 4, 4, 8, 8, 16]
    assert sum(n for _, n, ok in log if ok) == 15  # every good file decoded by exactly one successful call
    assert list(refused) == [11] and "Failed to get image info: 3" in refused[11]
    assert images[11] is None and all(im is not None for i, im in enumerate(images) if i != 11)
    for f, image in zip(files, images, strict=True):
        if image is not None:
            assert torch.equal(image, _REAL_DECODE(torch.frombuffer(bytearray(f), dtype=torch.uint8)))


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   RuntimeError("Error while decoding JPEG images: nvjpegDecodeBatched failed: 5")])
def test_device_faults_propagate_naming_the_batch_and_the_pipeline(tmp_path, monkeypatch, fault):
    root = write_jpeg_folders(tmp_path, classes=1, per_class=8)

    def decode(data, mode=None, device=None):  # noqa: ANN001, ANN202
        raise fault

    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: decode)
    pipeline = _pipeline(root, prefetch=2)
    with pytest.raises(type(fault)) as caught:
        next(iter(pipeline))
    assert str(caught.value).startswith("device data pipeline (--data-pipeline gpu), batch 1 of 2 on cpu: ")
    assert str(fault) in str(caught.value)
    assert not _producer_threads()


def _pipeline(root: Path, prefetch: int = 2, batch_size: int = 4) -> DevicePipeline:
    from moco_transfer.pretrain.gpu_augment import BatchedMocoAugment

    loader = torch.utils.data.DataLoader(ImageBytesDataset(root), batch_size=batch_size, collate_fn=collate_raw,
                                         drop_last=True, shuffle=False)
    return DevicePipeline(loader, BatchedMocoAugment(16, crop_min=0.5), CPU, prefetch=prefetch)


def _producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moco-device-pipeline" and t.is_alive()]


def test_files_decoded_on_the_cpu_are_counted_per_epoch_and_warned_about_once(tmp_path, monkeypatch):
    root = write_jpeg_folders(tmp_path, classes=1, per_class=10)  # + extra.png and gray.jpg: decoded in workers
    refused = root / "class_0" / "img_004.jpg"
    refused.write_bytes(_with_comment(refused.read_bytes(), b"REFUSE-ME"))  # the device refuses, PIL reads it
    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: _RecordingDecode([]))
    pipeline = _pipeline(root, batch_size=12)
    batches = list(pipeline)
    assert len(batches) == 1 and batches[0][2] == []
    record = pipeline.epoch_record()
    assert record["decoded_on_cpu"] == 3 and record["device_refused"] == 1
    assert sorted(Path(p).name for p in record["decoded_on_cpu_examples"]) == ["extra.png", "gray.jpg", "img_004.jpg"]
    warning = pipeline.fallback_warning()
    assert warning.startswith("warning: 3 of 12 images (25.0%) this epoch were decoded with PIL in the loader "
                              "workers because they are not baseline 8-bit RGB JPEGs")
    list(pipeline)
    assert pipeline.epoch_record()["decoded_on_cpu"] == 3  # per epoch, not summed over epochs
    assert pipeline.fallback_warning() is None  # once per run


def test_the_device_refusing_most_fallbacks_names_the_decoder(tmp_path, monkeypatch):
    root = tmp_path / "data" / "class_0"
    root.mkdir(parents=True)
    for i in range(8):
        (root / f"img_{i}.jpg").write_bytes(_with_comment(_jpeg(_array(20, 20, i)), b"REFUSE-ME" if i < 2 else b"ok"))
    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: _RecordingDecode([]))
    pipeline = _pipeline(root.parent, batch_size=8)
    list(pipeline)
    assert pipeline.epoch_record()["device_refused"] == 2
    assert "mostly because the device decoder refused them" in pipeline.fallback_warning()


def test_every_batch_of_an_epoch_is_the_same_however_it_is_reached_and_with_or_without_the_thread(tmp_path):
    data = write_jpeg_folders(tmp_path / "data")
    cfg = resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(tmp_path / "out")})
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, CPU), CPU)
    assert loader.prefetch > 0

    def epoch(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seed_epoch(loader, cfg.seed, epoch)
        return [(torch.cat(views), targets) for views, targets, _ in loader]

    a0, a1, b0 = epoch(0), epoch(1), epoch(0)
    loader.prefetch = 0
    c0 = epoch(0)
    assert len(a0) == len(loader) == 3
    for (va, ta), (vb, tb), (vc, tc) in zip(a0, b0, c0, strict=True):
        assert torch.equal(va, vb) and torch.equal(ta, tb) and torch.equal(va, vc) and torch.equal(ta, tc)
    assert not any(torch.equal(va, v1) for (va, _), (v1, _) in zip(a0, a1, strict=True))


def test_a_step_that_raises_stops_the_producer_thread(tmp_path):
    from moco_transfer.pretrain.engine import build_model, build_optimizer, train_one_epoch

    data = write_jpeg_folders(tmp_path / "data")
    cfg = resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(tmp_path / "out")})
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, CPU), CPU)
    seed_epoch(loader, cfg.seed, 0)
    model = build_model(cfg)

    def fail(*args: object) -> None:
        raise KeyboardInterrupt

    model.forward = fail
    with pytest.raises(KeyboardInterrupt) as caught:
        train_one_epoch(model, loader, build_optimizer(model, cfg), torch.amp.GradScaler("cpu", enabled=False), cfg,
                        CPU, 0, 0.01)
    # Stopped by train_one_epoch itself: the traceback held here keeps its frame (and the iterator) alive.
    assert caught.value is not None and not _producer_threads()


def test_the_log_records_cpu_decoded_and_skipped_files(tmp_path):
    from moco_transfer.pretrain.engine import run_pretraining

    data = write_jpeg_folders(tmp_path / "data")
    (data / "class_1" / "img_005.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt \xff\xd9")
    cfg = resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(tmp_path / "out"),
                                              "epochs": 1})
    run_pretraining(cfg)
    record = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[0])
    assert record["decoded_on_cpu"] == 2 and record["device_refused"] == 0  # extra.png and gray.jpg
    assert record["skipped_files"] >= 1 and all("img_005.jpg" in p for p in record["skipped_examples"])


def test_a_run_stopped_in_epoch_3_resumes_to_the_losses_and_weights_of_a_straight_run(tmp_path, monkeypatch,
                                                                                      capsys, one_thread):
    """In process: the SIGKILL itself is tested with the CPU pipeline (test_pretrain_engine); what the device
    pipeline adds is that its producer thread draws each epoch's views the same after a resume."""
    from moco_transfer.checkpoint import load_checkpoint
    from moco_transfer.pretrain import engine

    data = write_jpeg_folders(tmp_path / "data", classes=2, per_class=23)  # 48 files: 6 steps per epoch
    settings = {**TINY, "data": str(data), "epochs": 4, "seed": 3, "log_every": 0.05, "workers": 1}
    engine.run_pretraining(resolve_config("mocov2", overrides={**settings, "output": str(tmp_path / "straight")}))
    real_epoch = engine.train_one_epoch

    def crash_in_epoch_3(model, loader, *args, **kwargs):  # noqa: ANN001, ANN202
        if args[4] == 2:
            raise KeyboardInterrupt  # the run dies with epoch 2's checkpoint on disk
        return real_epoch(model, loader, *args, **kwargs)

    stopped = resolve_config("mocov2", overrides={**settings, "output": str(tmp_path / "stopped")})
    monkeypatch.setattr(engine, "train_one_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        engine.run_pretraining(stopped)
    monkeypatch.setattr(engine, "train_one_epoch", real_epoch)
    engine.run_pretraining(stopped, resume="auto")
    a = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        assert rb["acc1"] == pytest.approx(ra["acc1"], abs=1e-3)
    sa = load_checkpoint(tmp_path / "straight" / "checkpoint_0003.pth.tar")["state_dict"]
    sb = load_checkpoint(tmp_path / "stopped" / "checkpoint_0003.pth.tar")["state_dict"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5) for k in sa)
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 1/4: " in err  # not a terminal: plain progress lines
    assert not _producer_threads()


def test_a_generator_state_of_the_other_device_type_keeps_the_place_and_says_so(tmp_path):
    """A mid-epoch checkpoint of `--data-pipeline gpu` written on a GPU (a 16-byte Philox state) resumed on the
    CPU (a 5,056-byte Mersenne state), or the reverse, must resume at its batch, not crash in set_state."""
    cfg = resolve_config("digits", overrides={"data_pipeline": "gpu", "workers": 0, "output": str(tmp_path)})
    pipeline = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, CPU), CPU)
    seed_epoch(pipeline, cfg.seed, 0)
    seeded = pipeline.generator.get_state()
    cuda_like = torch.zeros(16, dtype=torch.uint8)
    note = start_epoch_at(pipeline, 3, cuda_like)
    assert note is not None and "another device type" in note and "batches and their order are the same" in note
    assert torch.equal(pipeline.generator.get_state(), seeded) and pipeline.sampler.start == 3
    other = torch.Generator().manual_seed(99).get_state()
    assert start_epoch_at(pipeline, 2, other) is None
    assert torch.equal(pipeline.generator.get_state(), other) and pipeline.sampler.start == 2
