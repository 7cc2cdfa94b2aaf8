"""The online linear probe's cost per training step, measured side by side with the engine's own step.

Both columns run `train_one_epoch` (the engine's step: MoCo forward, backward, SGD, figures buffer) on the
same random batches, alternating with and without the probe, and keep each side's median time per step.

    python benchmarks/bench_online_probe.py                                  # resnet18, 28 px, batch 256, 10 classes
    python benchmarks/bench_online_probe.py --arch resnet50 --image-size 64 --batch-size 32 --classes 1000
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moco_transfer.backbone import feature_dim
from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.engine import EpochControl, build_model, build_optimizer, train_one_epoch
from moco_transfer.pretrain.online_probe import OnlineProbe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per side")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "auto"])
    args = parser.parse_args()

    small = args.image_size <= 64
    cfg = resolve_config("mocov2", overrides=dict(arch=args.arch, small_images=small, image_size=args.image_size,
                                                  batch_size=args.batch_size, moco_k=args.batch_size * 16,
                                                  bn_splits=8 if args.batch_size % 8 == 0 else 1, amp=args.amp,
                                                  tensorboard=False))
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [([torch.randn(shape), torch.randn(shape)], torch.randint(0, args.classes, (args.batch_size,)), [])
               for _ in range(args.steps)]
    probe = OnlineProbe(model.encoder_q.fc, feature_dim(args.arch), args.classes, device)

    def per_step(with_probe: bool) -> float:
        probe.discard()  # the hook stays registered: drop what it caught in a run without the probe
        start = time.perf_counter()
        train_one_epoch(model, batches, optimizer, scaler, cfg, device, 0, cfg.effective_lr,
                        EpochControl(probe=probe if with_probe else None))
        return (time.perf_counter() - start) / args.steps

    per_step(True)  # warm-up (allocator, oneDNN kernels)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for side in (False, True):
            times[side].append(per_step(side))
    plain, probed = statistics.median(times[False]), statistics.median(times[True])
    feats = torch.randn(args.batch_size, feature_dim(args.arch))
    targets = torch.randint(0, args.classes, (args.batch_size,))

    def probe_alone() -> float:  # the added work by itself: BN, linear forward and backward, SGD step
        start = time.perf_counter()
        for _ in range(20):
            probe._take(None, (feats,))
            probe.step(targets)
        return (time.perf_counter() - start) / 20

    alone = statistics.median(probe_alone() for _ in range(5))
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {args.classes} classes, amp {cfg.amp}, "
          f"{torch.get_num_threads()} threads")
    print("| step | ms/step |")
    print("|---|---|")
    print(f"| MoCo step | {plain * 1e3:.1f} |")
    print(f"| MoCo step + online probe | {probed * 1e3:.1f} |")
    print(f"| difference | {(probed - plain) * 1e3:.1f} ms ({(probed / plain - 1) * 100:+.1f}%) |")
    print(f"| the probe's step alone | {alone * 1e3:.2f} ({alone / plain * 100:.2f}% of a MoCo step) |")


if __name__ == "__main__":
    main()
