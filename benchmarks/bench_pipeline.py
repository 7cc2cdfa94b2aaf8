"""Data pipeline vs training step, measured side by side in one run on an ImageNet-like JPEG folder.

The JPEGs are photo-like by default: crops of scikit-learn's two sample photographs, rescaled to --jpeg-size
and saved at quality 90 (synthetic colour waves decode faster than photographs; `--jpeg-source synthetic`).
Prints, for the same data, model and batch:
  (o) the official MoCo loader (ImageFolder + two draws of torchvision's aug+) against this project's CPU
      loader (the same draws, its slow ops swapped: pretrain/cpu_views.py), in the main process on one thread
      and with one worker per core; images/s and the ratio, each the best of alternating passes;
  (a) the CPU loader (workers decode and augment with PIL) alone, images/s with N workers;
  (b) the device pipeline alone (workers read bytes; decode_jpeg and both views on the device), with
      decode and augmentation timed apart;
  (c) the model-only training step on views already on the device;
  (d) end-to-end training (train_one_epoch) with each pipeline, and its ratio to (c);
  (e) end to end with the device pipeline and torch.compile'd encoders (--compile), its compile time apart,
      and the loss of the compiled and the eager model on one identical batch.
Targets on a GPU: end-to-end bf16 with the device pipeline >= 0.90 of the model-only step; the device pipeline
alone >= 2x the model-only step. `--json PATH` also writes every figure there (benchmarks/gpu_check.sh does).

    python benchmarks/bench_pipeline.py                    # resnet50, 224 px, batch 256, bf16 + channels_last on CUDA
    python benchmarks/bench_pipeline.py --quick            # tiny, on CPU: a smoke test (resnet18, 32 px, few steps)
    python benchmarks/bench_pipeline.py --workers 16 --keep-data /tmp/jpegs --json figures.json
    python benchmarks/bench_pipeline.py --only-loaders --device cpu   # (o) alone: the CPU loaders side by side
"""

from __future__ import annotations

import argparse
import functools
import io
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from moco_transfer.augment import TwoCrops, moco_v2_augmentation
from moco_transfer.fileio import write_json_atomic
from moco_transfer.pretrain.config import PretrainConfig, resolve_config
from moco_transfer.pretrain.data import build_pretrain_dataset, build_pretrain_loader, seed_epoch
from moco_transfer.pretrain.engine import build_model, build_optimizer, compile_encoders, train_one_epoch
from moco_transfer.pretrain.gpu_pipeline import DevicePipeline, resolve_pipeline, training_dtype


@functools.cache
def _photographs() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images


def _photo(i: int, width: int, height: int) -> Image.Image:
    """A random crop (half to all of the height, the target's aspect) of a real photograph, maybe mirrored."""
    photos = _photographs()
    rng = np.random.default_rng(i)
    source = photos[i % len(photos)]
    h = int(source.shape[0] * rng.uniform(0.5, 1.0))
    w = min(int(h * width / height), source.shape[1])
    top, left = rng.integers(0, source.shape[0] - h + 1), rng.integers(0, source.shape[1] - w + 1)
    image = Image.fromarray(source[top:top + h, left:left + w]).resize((width, height), Image.BICUBIC)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _write_images(args: tuple[Path, int, int, int, int, int, str]) -> int:
    """Photo crops, or smooth colour waves plus sensor-like noise (tens of KB, unlike pure noise)."""
    root, start, stop, classes, width, height, source = args
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    total = 0
    for i in range(start, stop):
        if source == "photos":
            out = io.BytesIO()
            _photo(i, width, height).save(out, "JPEG", quality=90)
            (root / f"class_{i % classes:02d}" / f"img_{i:06d}.jpg").write_bytes(out.getvalue())
            total += out.tell()
            continue
        rng = np.random.default_rng(i)
        image = np.empty((height, width, 3), np.float32)
        for c in range(3):
            fx, fy = rng.uniform(0.5, 6, 2) / np.array([width, height])
            image[..., c] = 128 + 60 * np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 6.3))
            fx, fy = rng.uniform(6, 40, 2) / np.array([width, height])
            image[..., c] += 30 * np.sin(2 * np.pi * (fx * xx - fy * yy) + rng.uniform(0, 6.3))
        image += rng.normal(0, 8, image.shape)
        out = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
        folder = root / f"class_{i % classes:02d}"
        (folder / f"img_{i:06d}.jpg").write_bytes(out.getvalue())
        total += out.tell()
    return total


def write_jpeg_folder(root: Path, images: int, size: tuple[int, int], classes: int, workers: int,
                      source: str = "photos") -> float:
    """`images` JPEGs of `size` (width, height) in `classes` folders; returns the mean file size in KB."""
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    chunks = [(root, s, min(s + 64, images), classes, *size, source) for s in range(0, images, 64)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            total = sum(pool.map(_write_images, chunks))
    else:
        total = sum(map(_write_images, chunks))
    return total / images / 1024


def row(label: str, rate: float, note: str = "") -> None:
    print(f"{label:<70s}{rate:10.1f} img/s   {note}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timed:
    """Iterates `loader`, noting when batch `skip` is handed out: start-up (worker spawn) is left out."""

    def __init__(self, loader: Any, skip: int) -> None:
        self.loader, self.skip, self.started, self.counted = loader, skip, None, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i == self.skip:
                self.started = time.perf_counter()
            elif i > self.skip:
                self.counted += 1
            yield batch

    def rate(self, batch: int, ended: float, consumed: bool) -> float:
        """images/s since batch `skip` was handed out: the batches made since, plus that one when it was also
        consumed in the interval (a training step), not when only the loader is timed."""
        if self.started is None:
            return float("nan")
        return (self.counted + consumed) * batch / (ended - self.started)


class RepeatedViews:
    """A loader that hands out the same device batch: the training step without any data cost."""

    def __init__(self, views: list[torch.Tensor], steps: int) -> None:
        self.views, self.steps = views, steps
        self.targets = torch.zeros(views[0].shape[0], dtype=torch.long)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        for _ in range(self.steps):
            yield self.views, self.targets, []


def loader_rate(loader: Iterable, device: torch.device, batch: int, skip: int, batches: int | None = None) -> float:
    """images/s after batch `skip` (worker start-up left out); `batches`: only that many more."""
    timed = Timed(loader, skip)
    for _ in itertools.islice(timed, None if batches is None else skip + 1 + batches):
        pass
    sync(device)
    return timed.rate(batch, time.perf_counter(), consumed=False)


def official_loader(folder: Path, size: int, batch: int, workers: int) -> torch.utils.data.DataLoader:
    """The MoCo repository's data path (main_moco.py): ImageFolder, two draws of torchvision's aug+, shuffled."""
    dataset = torchvision.datasets.ImageFolder(str(folder), TwoCrops(moco_v2_augmentation(size)))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True)


def compare_loaders(cfg: PretrainConfig, folder: Path, workers: int, batch: int, batches: int, rounds: int
                    ) -> dict[str, float]:
    """(o): the official loader and ours on the same JPEGs, alternating, best pass of each; one thread in the
    main process, then one worker per core."""
    figures: dict[str, float] = {}
    threads = torch.get_num_threads()
    for label, n in (("one_thread", 0), ("all_cores", workers)):
        ours_cfg = PretrainConfig(**{**cfg.to_dict(), "batch_size": batch, "workers": n})
        ours = build_pretrain_loader(ours_cfg, build_pretrain_dataset(ours_cfg), torch.device("cpu"))
        seed_epoch(ours, 0, 0)
        official = official_loader(folder, cfg.image_size, batch, n)
        skip = 1 if n == 0 else n
        best = {"official": 0.0, "ours": 0.0}
        torch.set_num_threads(1 if n == 0 else threads)
        try:
            for _ in range(rounds):
                for name, loader in (("official", official), ("ours", ours)):
                    best[name] = max(best[name], loader_rate(loader, torch.device("cpu"), batch, skip - 1, batches))
        finally:
            torch.set_num_threads(threads)
        ratio = best["ours"] / best["official"]
        where = "main process, one thread" if n == 0 else f"{n} workers"
        row(f"(o) official MoCo loader (ImageFolder + torchvision aug+), {where}", best["official"])
        row(f"    this project's CPU loader, {where}", best["ours"], f"{ratio:.2f}x the official")
        figures.update({f"o_official_{label}": best["official"], f"o_ours_{label}": best["ours"],
                        f"o_ratio_{label}": ratio})
    return figures


def train_rate(cfg: PretrainConfig, loader: Any, device: torch.device, skip: int, epochs: int
               ) -> tuple[float, list[float], float]:
    """images/s of train_one_epoch (the real loop) over the last epoch, its first `skip` batches left out; each
    epoch's wall time (the first one holds compilation when cfg.compile); the first epoch's mean loss. The model,
    optimizer and scaler are built as the engine builds them, the weights and key shuffles alike for every call."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_encoders(model)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    torch.manual_seed(1)
    rate, walls, losses = float("nan"), [], []
    for epoch in range(epochs):
        if hasattr(loader, "sampler"):  # a DataLoader or a DevicePipeline, not RepeatedViews
            seed_epoch(loader, cfg.seed, epoch)
        timed = Timed(loader, skip)
        started = time.perf_counter()
        losses.append(train_one_epoch(model, timed, optimizer, scaler, cfg, device, epoch, cfg.effective_lr).loss)
        walls.append(time.perf_counter() - started)
        rate = timed.rate(cfg.batch_size, time.perf_counter(), consumed=True)  # the epoch ends with a sync
    return rate, walls, losses[0]


def compiled_loss_gap(cfg: PretrainConfig, views: list[torch.Tensor], device: torch.device) -> float:
    """|loss(compiled) - loss(eager)| / loss(eager) of the engine's step on one identical batch, same weights and
    key shuffle."""
    eager, compiled = (train_rate(PretrainConfig(**{**cfg.to_dict(), "compile": c}), RepeatedViews(views, 1), device,
                                  0, 1)[2] for c in (False, True))
    return abs(compiled - eager) / abs(eager)


def device_parts(cfg: PretrainConfig, pipeline: DevicePipeline, device: torch.device, repeats: int
                 ) -> tuple[float, float, list[torch.Tensor]]:
    """Decode alone and the two views alone, on one batch of bytes already in memory (images/s each)."""
    payload, layout, _, _ = next(iter(pipeline.loader))
    times_decode, times_views = [], []
    with pipeline.decoder.on_stream():  # where the pipeline makes them; sync() waits for every stream
        pipeline.decode(payload, layout)
        images, _ = pipeline.decode(payload, layout)
        views = pipeline.augment.views(images, pipeline.generator)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            images, _ = pipeline.decode(payload, layout)
            sync(device)
            t1 = time.perf_counter()
            views = pipeline.augment.views(images, pipeline.generator)
            sync(device)
            times_decode.append(t1 - t0)
            times_views.append(time.perf_counter() - t1)
    n = layout.shape[0]
    return n / statistics.median(times_decode), n / statistics.median(times_views), views


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke test: resnet18, 32 px, few steps")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per pass (24; --quick 4)")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: all CPU cores)")
    parser.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                        help="auto: bf16 + channels_last on CUDA, none on CPU")
    parser.add_argument("--jpeg-size", default=None, help="WIDTHxHEIGHT of the JPEGs (500x375)")
    parser.add_argument("--jpeg-source", choices=["photos", "synthetic"], default="photos",
                        help="crops of scikit-learn's sample photographs (default) or synthetic colour waves")
    parser.add_argument("--only-loaders", action="store_true", help="measure (o) alone: the CPU loaders")
    parser.add_argument("--keep-data", default=None, help="write (or reuse) the JPEG folder here and keep it")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure (e), torch.compile'd encoders (default: on CUDA without --quick)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quick = args.quick
    if quick:  # a smoke test on a shared CI box: one thread per process avoids OpenMP oversubscription stalls
        torch.set_num_threads(1)
    arch = args.arch or ("resnet18" if quick else "resnet50")
    size = args.image_size or (32 if quick else 224)
    batch = args.batch_size or (16 if quick else 256)
    steps = args.steps or (4 if quick else 24)
    workers = args.workers if args.workers is not None else (min(2, cores) if quick else cores)
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    jpeg = tuple(int(v) for v in (args.jpeg_size or ("96x72" if quick else "500x375")).split("x"))
    skip = 1 if quick else 3  # batches left out of each timing: worker start-up, first-batch latency
    with_compile = args.compile if args.compile is not None else (device.type == "cuda" and not quick)
    figures: dict[str, Any] = {}

    folder = Path(args.keep_data) if args.keep_data else Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    o_batch = 8 if quick else 32
    images = o_batch * (max(workers, 1) + 13) if args.only_loaders else batch * (steps + skip)
    try:
        existing = sorted(folder.glob("class_*/*.jpg"))
        if len(existing) >= images:
            kb = sum(p.stat().st_size for p in existing) / len(existing) / 1024
            images = len(existing) - len(existing) % batch
        else:
            start = time.perf_counter()
            kb = write_jpeg_folder(folder, images, jpeg, classes=10, workers=max(workers, 1),
                                   source=args.jpeg_source)
            print(f"wrote {images} {args.jpeg_source} {jpeg[0]}x{jpeg[1]} JPEGs ({kb:.0f} KB each) in "
                  f"{time.perf_counter() - start:.1f} s")
        base = dict(data=str(folder), output=str(folder / "_out"), arch=arch, small_images=False,
                    image_size=size, batch_size=batch, moco_k=batch * (16 if quick else 256), workers=workers,
                    amp=amp, channels_last=device.type == "cuda", bn_splits=2 if quick else 8,
                    device=device.type, log_every=0.0)
        cpu_cfg = resolve_config("mocov2", overrides={**base, "data_pipeline": "cpu"})
        gpu_cfg = resolve_config("mocov2", overrides={**base, "data_pipeline": "gpu"})
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device} ({name}), "
              f"{cores} CPU cores, {torch.get_num_threads()} threads")
        figures.update(torch=torch.__version__, torchvision=torchvision.__version__, device=name, cpu_cores=cores,
                       arch=arch, image_size=size, batch=batch, amp=amp, channels_last=base["channels_last"],
                       workers=workers, jpeg=f"{jpeg[0]}x{jpeg[1]}", jpeg_kb=round(kb, 1), jpeg_source=args.jpeg_source)
        print(f"{images} JPEGs of {jpeg[0]}x{jpeg[1]} ({kb:.0f} KB); {arch} {size}px, batch {batch}, amp {amp}"
              f"{', channels_last' if base['channels_last'] else ''}, K {base['moco_k']}; "
              f"first {skip} batch(es) of each pass untimed")

        figures.update(compare_loaders(cpu_cfg, folder, workers, o_batch, batches=2 if quick else 12,
                                       rounds=1 if quick else 4))
        if args.only_loaders:
            if args.json:
                write_json_atomic(figures, args.json)
            return
        cpu_loader = build_pretrain_loader(cpu_cfg, build_pretrain_dataset(cpu_cfg, device), device)
        seed_epoch(cpu_loader, 0, 0)
        a = loader_rate(cpu_loader, device, batch, skip)
        per_worker = a / max(workers, 1)
        row(f"(a) CPU loader alone: PIL aug+, two views, {workers} workers", a, f"{per_worker:.1f} per worker")
        figures.update(a_cpu_loader=a, a_per_worker=per_worker)

        gpu_loader = build_pretrain_loader(gpu_cfg, build_pretrain_dataset(gpu_cfg, device), device)
        assert resolve_pipeline(gpu_cfg, device) == "gpu" and isinstance(gpu_loader, DevicePipeline)
        seed_epoch(gpu_loader, 0, 0)
        b = loader_rate(gpu_loader, device, batch, skip)
        decode, views_rate, views = device_parts(gpu_cfg, gpu_loader, device, repeats=3 if quick else 10)
        row(f"(b) device pipeline alone: {workers} workers read bytes, {device.type} decodes + augments", b,
            f"one batch in memory: decode {decode:.0f}, two views {views_rate:.0f} img/s")
        figures.update(b_device_pipeline=b, b_decode_one_batch=decode, b_views_one_batch=views_rate,
                       b_decoded_on_cpu=gpu_loader.epoch_record()["decoded_on_cpu"])

        assert views[0].dtype == training_dtype(gpu_cfg)
        epochs = 1 if quick else 2  # the first of two epochs warms up the allocator, cuDNN and oneDNN
        c, _, _ = train_rate(gpu_cfg, RepeatedViews(views, steps + skip), device, skip, epochs)
        row(f"(c) model-only training step, views already on {device.type}", c,
            f"a CPU loader would need ~{c / per_worker:.1f} workers to keep up; device pipeline alone "
            f"{b / c:.2f}x this (target >= 2)")
        figures.update(c_model_only_step=c, b_over_c=b / c, cpu_workers_needed=c / per_worker)

        d_cpu, _, _ = train_rate(cpu_cfg, cpu_loader, device, skip, epochs)
        d_gpu, _, _ = train_rate(gpu_cfg, gpu_loader, device, skip, epochs)
        row("(d) end-to-end training, cpu pipeline", d_cpu, f"{d_cpu / c:.2f} of the model-only step")
        row("    end-to-end training, gpu pipeline", d_gpu, f"{d_gpu / c:.2f} of the model-only step "
            "(target >= 0.90 on a GPU)")
        figures.update(d_cpu_pipeline=d_cpu, d_gpu_pipeline=d_gpu, d_cpu_over_c=d_cpu / c, d_gpu_over_c=d_gpu / c)

        if with_compile:
            compile_cfg = PretrainConfig(**{**gpu_cfg.to_dict(), "compile": True})
            e, walls, _ = train_rate(compile_cfg, gpu_loader, device, skip, max(epochs, 2))
            compile_s = max(walls[0] - walls[-1], 0.0)
            gap = compiled_loss_gap(gpu_cfg, views, device)
            row("(e) end-to-end training, gpu pipeline, --compile", e,
                f"{e / d_gpu:.2f}x eager end to end; compile ~{compile_s:.0f} s (first epoch minus a later one); "
                f"loss vs eager on one batch: {gap:.1e} relative")
            figures.update(e_compile=e, e_over_d_gpu=e / d_gpu, e_over_c=e / c, compile_seconds=compile_s,
                           compile_loss_relative_gap=gap)
        if args.json:
            write_json_atomic(figures, args.json)
    finally:
        if not args.keep_data:
            shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
