"""Pretraining benchmarks, measured side by side in one run.

1. MoCo step overhead: one training step of the engine's train_one_epoch (MoCo forward with momentum update,
   shuffle, queue, loss, backward, SGD step, the step loop's bookkeeping) divided by its irreducible parts on
   the same batch (query encoder forward+backward plus key encoder forward). Target <= 1.10 on CPU.
2. Data pipeline: images/s the loader delivers with the embedded default's workers vs images/s the engine's
   step consumes; the loader must not be the bottleneck.
3. Mid-epoch checkpoints (`--checkpoint-every-min`): the seconds one save of a MoCo v2 ResNet-50 checkpoint
   (both encoders, queue, SGD momentum) takes here, as a fraction of training time at each interval. Target
   < 1% at the default (30 min).

    python benchmarks/bench_pretrain.py            # resnet18 and resnet50
    python benchmarks/bench_pretrain.py --quick    # resnet18 only, fewer repeats
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from bench_pipeline import RepeatedViews  # this folder's: the script's own folder is on sys.path

from moco_transfer.checkpoint import atomic_save
from moco_transfer.pretrain.config import PretrainConfig, resolve_config
from moco_transfer.pretrain.data import build_pretrain_dataset, build_pretrain_loader, seed_epoch
from moco_transfer.pretrain.engine import build_model, build_optimizer, checkpoint_dict, train_one_epoch


def _timed(fn, repeats: int) -> list[float]:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def engine_seconds(cfg: PretrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   views: list[torch.Tensor], steps: int) -> float:
    """Wall time of `steps` training steps on one batch of views, through the engine's own train_one_epoch: a
    benchmark times the code that trains."""
    start = time.perf_counter()
    train_one_epoch(model, RepeatedViews(views, steps), optimizer, torch.amp.GradScaler("cpu", enabled=False), cfg,
                    torch.device("cpu"), 0, cfg.effective_lr)
    return time.perf_counter() - start


def step_overhead(arch: str, image_size: int, batch: int, repeats: int, bn_splits: int, steps: int = 3) -> None:
    cfg = resolve_config("mocov2", overrides=dict(arch=arch, small_images=True, image_size=image_size, batch_size=batch,
                                                  bn_splits=bn_splits, amp="none", device="cpu", log_every=0.0))
    torch.manual_seed(0)
    model = build_model(cfg)  # K 65536, m 0.999, T 0.2, MLP head
    optimizer = build_optimizer(model, cfg)
    views = [torch.randn(batch, 3, image_size, image_size) for _ in range(2)]

    def irreducible() -> None:
        for _ in range(steps):
            model.encoder_q.zero_grad(set_to_none=True)
            model.encoder_q(views[0]).sum().backward()
            with torch.no_grad():
                model.encoder_k(views[1])

    engine_seconds(cfg, model, optimizer, views, 1)  # warm-up: allocator, oneDNN primitives
    irreducible()
    full, base = [], []
    for _ in range(repeats):  # interleaved, so load changes hit both alike
        full.append(engine_seconds(cfg, model, optimizer, views, steps) / steps)
        base += [t / steps for t in _timed(irreducible, 1)]
    f, b = min(full), min(base)
    params = sum(p.numel() for p in model.encoder_q.parameters()) / 1e6
    print(f"  {arch:9s} {image_size}px batch {batch}, K {cfg.moco_k}, {params:.1f}M params: full step {f * 1000:8.1f} "
          f"ms, irreducible {b * 1000:8.1f} ms  ->  overhead ratio {f / b:.3f}  (target <= 1.10; "
          f"medians {statistics.median(full) / statistics.median(base):.3f})")


def data_pipeline(batches: int, steps: int = 5) -> None:
    cfg = resolve_config(overrides={"log_every": 0.0})  # the embedded default preset, no progress lines
    device = torch.device("cpu")
    loader = build_pretrain_loader(cfg, build_pretrain_dataset(cfg), device)
    seed_epoch(loader, cfg.seed, 0)
    start, seen = time.perf_counter(), 0
    for i, (views, _, _) in enumerate(loader):
        seen += views[0].shape[0]
        if i + 1 == batches:
            break
    load_rate = seen / (time.perf_counter() - start)

    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    views = next(iter(loader))[0]
    engine_seconds(cfg, model, optimizer, views, 1)  # warm-up
    step_rate = cfg.batch_size * steps / engine_seconds(cfg, model, optimizer, views, steps)
    print(f"  embedded default ({cfg.preset}, {cfg.arch} {cfg.image_size}px, batch {cfg.batch_size}, "
          f"{cfg.workers} worker(s)): loader {load_rate:8.1f} img/s, step {step_rate:8.1f} img/s  ->  "
          f"loader / step {load_rate / step_rate:.2f}  (target > 1: the loader is not the bottleneck)")


def checkpoint_cost(repeats: int) -> None:
    cfg = resolve_config("mocov2")  # ResNet-50, MLP head, K 65536
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates the momentum buffers a real checkpoint holds
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/checkpoint_mid_epoch.pth.tar"

        def save() -> None:
            atomic_save(checkpoint_dict(cfg, model, optimizer, scaler, 0, [], None), path)

        seconds = statistics.median(_timed(save, repeats))
        size = os.path.getsize(path) / 2**20
    default = PretrainConfig().checkpoint_every_min
    fractions = ", ".join(f"every {m:g} min {100 * seconds / (m * 60):.2f}%" for m in (5, 10, default))
    print(f"  MoCo v2 resnet50 checkpoint, {size:.0f} MiB: {seconds:.2f} s per save (median of {repeats}, with fsync) "
          f"->  {fractions} of training time  (target < 1% at the default {default:g} min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18 only, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print("MoCo step overhead (full step / (q fwd+bwd + k fwd), fastest of interleaved repeats):")
    step_overhead("resnet18", 32, 64, repeats, bn_splits=8)
    if not args.quick:
        step_overhead("resnet50", 32, 32, repeats, bn_splits=8)
    print("Data pipeline:")
    data_pipeline(batches=8)
    print("Mid-epoch checkpoints:")
    checkpoint_cost(repeats=3)


if __name__ == "__main__":
    main()
