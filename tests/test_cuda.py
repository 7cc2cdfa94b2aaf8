"""The GPU suite: `python -m pytest -m cuda` on a machine with an NVIDIA GPU (CI has none and skips these).

It proves on real CUDA what the CPU-tensor tests can only check as logic: the guarded decoder against the nvJPEG
allocation race, the self-check, decode fallbacks with nvJPEG's own errors, float16/bfloat16 resampling, no host
sync inside a training step, the CLI end to end in bf16 + channels_last, and SIGKILL + resume on the device
pipeline. Figures go to the JSON file named by $MOCO_GPU_CHECK_JSON (conftest's gpu_report; gpu_check.sh sets it).
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from moco_transfer.checkpoint import find_latest, load_checkpoint
from moco_transfer.pretrain import engine
from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.data import build_pretrain_dataset, build_pretrain_loader, seed_epoch
from moco_transfer.pretrain.device_check import sample_jpegs, self_check
from moco_transfer.pretrain.device_decode import DeviceDecoder
from moco_transfer.pretrain.gpu_augment import BatchedMocoAugment
from moco_transfer.pretrain.gpu_pipeline import DevicePipeline, pipeline_choice

from .conftest import GPU_REPORT as REPORT
from .test_gpu_pipeline import _array, _jpeg, write_jpeg_folders

pytestmark = pytest.mark.cuda

RACE_ITERATIONS = 200
SLEEP_CYCLES = 20_000_000


@pytest.fixture(scope="module", autouse=True)
def report(gpu_report):
    return gpu_report


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _encoded(jpegs: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]


def _race(decode, device: torch.device, shapes: list[tuple[int, ...]], iterations: int) -> int:  # noqa: ANN001
    """pytorch/vision PR 9606's pattern on the current stream: victims read by kernels queued behind a long one,
    freed before `decode()`; returns how many iterations saw a wrong sum."""
    bad = 0
    for _ in range(iterations):
        victims = [torch.full(s, 7, dtype=torch.uint8, device=device) for s in shapes * 4]
        torch.cuda.synchronize(device)
        expected = [7 * v.numel() for v in victims]
        torch.cuda._sleep(SLEEP_CYCLES)
        sums = [v.sum(dtype=torch.int64) for v in victims]
        del victims
        decode()
        torch.cuda.synchronize(device)
        bad += any(o != e for o, e in zip(torch.stack(sums).tolist(), expected, strict=True))
    return bad


def test_self_check_passes_in_under_two_seconds(cuda):
    result = self_check(cuda)
    REPORT["self_check"] = vars(result)
    assert result.problem is None, result.problem
    assert result.decode_mad <= 2.0 and result.corrupted_victims == 0
    assert result.seconds < 2.0


def test_the_guarded_decoder_never_overwrites_live_memory(cuda):
    jpegs = _encoded(sample_jpegs()[:3])
    decoder = DeviceDecoder(cuda)
    shapes = [tuple(im.shape) for im in decoder.decode(jpegs)[0]]
    with decoder.on_stream():
        guarded = _race(lambda: decoder.decode(jpegs), cuda, shapes, RACE_ITERATIONS)
    # The same pattern against the bare call, for the record: the hazard this guards against (not asserted: it
    # depends on the GPU's decoder engine and the driver).
    bare = _race(lambda: decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=cuda), cuda, shapes, RACE_ITERATIONS)
    REPORT["race"] = {"iterations": RACE_ITERATIONS, "guarded_corrupted": guarded, "bare_decode_jpeg_corrupted": bare}
    assert guarded == 0


def test_the_pipeline_thread_leaves_the_training_streams_memory_alone(tmp_path, cuda):
    """Victims on the training stream, freed while their reads wait; the producer thread decodes meanwhile."""
    data = write_jpeg_folders(tmp_path / "data", classes=2, per_class=40)
    cfg = resolve_config("mocov2", overrides={"data": str(data), "output": str(tmp_path / "out"), "arch": "resnet18",
                                              "image_size": 64, "batch_size": 16, "workers": 2,
                                              "data_pipeline": "gpu", "device": "cuda"})
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, cuda), cuda)
    bad = 0
    for epoch in range(5):
        seed_epoch(loader, cfg.seed, epoch)
        batches = iter(loader)
        for _ in range(len(loader)):
            bad += _race(lambda it=batches: next(it), cuda, [(3, 64, 64), (16, 3, 64, 64)], 1)
        batches.close()
    REPORT["pipeline_race_corrupted"] = bad
    assert bad == 0


def test_nvjpeg_errors_on_bad_files_fall_back_and_leave_the_device_usable(tmp_path, cuda):
    root = write_jpeg_folders(tmp_path / "data", classes=1, per_class=8)
    good = _jpeg(_array(30, 30, 1))
    sos = good.index(b"\xff\xda")
    (root / "class_0" / "img_002.jpg").write_bytes(good[:sos] + b"\xff\xd9")  # no scan: refused by every decoder
    (root / "class_0" / "img_005.jpg").write_bytes(good[: len(good) * 2 // 3] + b"\xff\xd9")  # cut short
    cfg = resolve_config("mocov2", overrides={"data": str(root), "output": str(tmp_path / "o"), "image_size": 32,
                                              "batch_size": 10, "workers": 0, "data_pipeline": "gpu"})
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, cuda), cuda)
    seed_epoch(loader, 0, 0)
    (views, targets, bad), = list(loader)
    record = loader.epoch_record()
    REPORT["bad_files"] = {"skipped": bad, **record, "decode_calls": loader.decoder.calls}
    assert views[0].shape == (10, 3, 32, 32) and torch.isfinite(views[0]).all()
    assert any("img_002.jpg" in b for b in bad)
    assert decode_jpeg(_encoded([good]), device=cuda)[0].shape == (3, 30, 30)  # nvJPEG still works


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_resampling_against_float32(cuda, dtype):
    images = [im.to(cuda) for im in [decode_jpeg(j) for j in _encoded(sample_jpegs()[:3])]]
    augment = BatchedMocoAugment(224, crop_min=0.2)
    sizes = torch.tensor([list(im.shape[1:]) for im in images], device=cuda)
    params = augment.sample_params(sizes, torch.Generator(device=cuda).manual_seed(0))
    outputs = {}
    for resize in (torch.float32, dtype):
        augment.resize_dtype = resize
        outputs[resize] = augment.apply(images, params).double() * 0.226 * 255  # about 0-255 levels
    diff = (outputs[dtype] - outputs[torch.float32]).abs()
    REPORT[f"resize_{str(dtype)[6:]}_vs_fp32_levels"] = {"mean": diff.mean().item(), "max": diff.max().item()}
    limit = 1.0 if dtype == torch.float16 else 3.0
    assert diff.max().item() <= limit


class _SyncGuard:
    """A loader whose batches are fetched with sync checks off, and whose consumer runs with them raising."""

    def __init__(self, loader: DevicePipeline) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # noqa: ANN204
        batches = iter(self.loader)
        try:
            while True:
                torch.cuda.set_sync_debug_mode(0)
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                torch.cuda.set_sync_debug_mode("error")
                yield batch
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_no_host_sync_inside_training_steps(tmp_path, cuda, monkeypatch):
    data = write_jpeg_folders(tmp_path / "data", classes=2, per_class=40)
    cfg = resolve_config("mocov2", overrides={"data": str(data), "output": str(tmp_path / "out"), "arch": "resnet18",
                                              "image_size": 64, "batch_size": 16, "moco_k": 256, "workers": 2,
                                              "amp": "bf16", "channels_last": True, "data_pipeline": "gpu",
                                              "device": "cuda"})
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, cuda), cuda)
    loader.prefetch = 0  # the producer's own waits happen in this thread, outside the checked steps
    model = engine.build_model(cfg).to(cuda).to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    seed_epoch(loader, cfg.seed, 0)
    engine.train_one_epoch(model, loader, optimizer, scaler, cfg, cuda, 0, 0.03)  # warm-up: first-step syncs
    monkeypatch.setattr(engine, "SYNC_SECONDS", math.inf)  # only the end-of-epoch read, after the last step
    seed_epoch(loader, cfg.seed, 1)
    stats = engine.train_one_epoch(model, _SyncGuard(loader), optimizer, scaler, cfg, cuda, 1, 0.03)
    REPORT["sync_errors_inside_steps"] = 0
    assert math.isfinite(stats.loss)


def _pretrain_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moco_transfer.cli", "pretrain", "--data", str(data), "-o", str(out),
            "--arch", "resnet18", "--image-size", "64", "--batch-size", "16", "--moco-k", "256", "-j", "2",
            "--device", "cuda", "--data-pipeline", "gpu", "--seed", "1", "--log-every", "0", *extra]


def _pretrain(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_pretrain_args(data, out, *extra), capture_output=True, text=True, check=True, timeout=300)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_cli_pretrain_on_the_gpu_pipeline_in_bf16_channels_last(tmp_path):
    data = write_jpeg_folders(tmp_path / "data", classes=2, per_class=40)
    done = _pretrain(data, tmp_path / "out", "--epochs", "2", "--amp", "bf16", "--channels-last")
    assert "gpu data pipeline" in done.stdout + done.stderr and "took the CPU pipeline" not in done.stderr
    log = _log(tmp_path / "out")
    REPORT["cli_bf16_losses"] = [r["loss"] for r in log]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)


def test_sigkill_and_resume_on_cuda_with_the_gpu_pipeline(tmp_path):
    data = write_jpeg_folders(tmp_path / "data", classes=2, per_class=63)  # 128 files: 8 steps per epoch
    _pretrain(data, tmp_path / "straight", "--epochs", "4")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_pretrain_args(data, killed, "--epochs", "4"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoint_0001.pth.tar").exists():
        time.sleep(0.02)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(find_latest(killed))["epoch"] in (2, 3)
    _pretrain(data, killed, "--epochs", "4", "--resume", "auto")
    a, b = _log(tmp_path / "straight"), _log(killed)
    assert [r["epoch"] for r in b] == [1, 2, 3, 4]
    diffs = [abs(ra["loss"] - rb["loss"]) / abs(ra["loss"]) for ra, rb in zip(a, b, strict=True)]
    REPORT["resume_fp32"] = {"exact": all(d == 0 for d in diffs), "max_relative_loss_difference": max(diffs)}
    assert max(diffs) <= 1e-3  # cuDNN picks kernels per process: equal to 1e-3, exact only when they agree


def test_auto_takes_the_gpu_pipeline_here(cuda):
    cfg = resolve_config("mocov2", overrides={"data": "x"})
    assert pipeline_choice(cfg, cuda) == ("gpu", "")
