"""Linear-probe benchmark on the embedded digits: `--cached` vs the faithful protocol, same epochs.

The faithful run pushes every augmented image through the frozen backbone every epoch; the cached run
extracts center-crop features once (timed, from an empty cache) and trains the same fc with the same
optimiser and schedule on them. Prints wall times, the speed-up and the top-1 difference.

    python benchmarks/bench_linear.py --checkpoint runs/digits/checkpoint_0199.pth.tar --epochs 10 --lr 0.01
    python benchmarks/bench_linear.py            # a randomly initialised resnet18 MoCo checkpoint
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from moco_transfer.backbone import build_resnet
from moco_transfer.builder import MoCo
from moco_transfer.checkpoint import with_module_prefix
from moco_transfer.eval.linear import LinearConfig, run_linear


def random_checkpoint(path: Path, image_size: int = 32) -> Path:
    """A MoCo v2 resnet18 (small stem) checkpoint with random weights, in this project's layout."""
    torch.manual_seed(0)
    model = MoCo(partial(build_resnet, "resnet18", small_images=True), dim=128, K=4096, mlp=True)
    torch.save({"epoch": 0, "arch": "resnet18", "state_dict": with_module_prefix(model.state_dict()),
                "config": {"arch": "resnet18", "small_images": True, "image_size": image_size, "mlp": True}}, path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None,
                   help="default: as `moco eval linear` (the checkpoint's preset's, else 30 x batch / 256)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cached-only", action="store_true", help="time the cached runs alone (no faithful run)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = args.checkpoint or random_checkpoint(tmp / "random.pth.tar")
        runs = {}
        cached = [("cached", tmp / "cache"), ("cached (warm cache)", tmp / "cache")]
        for mode, cache in [("faithful", None)][args.cached_only:] + cached:
            cfg = LinearConfig(mode=mode.split()[0], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               workers=args.workers)
            t0 = time.perf_counter()
            report = run_linear(ckpt, tmp / mode.split()[0], None, cfg, cache_dir=cache, use_cache=cache is not None)
            runs[mode] = (time.perf_counter() - t0, report)
    first = next(iter(runs.values()))[1]
    print(f"\ncheckpoint {ckpt if args.checkpoint else '(random resnet18)'}: {first['arch']}, "
          f"{first['image_size']} px, embedded digits {first['num_train']} train / {first['num_val']} val, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {first['lr']}, {torch.get_num_threads()} threads")
    for mode, (seconds, report) in runs.items():
        extra = f", features {report['feature_seconds']:.1f} s" if "feature_seconds" in report else ""
        train = sum(h["train_seconds"] for h in report["history"]) / args.epochs
        print(f"  {mode:20s} {seconds:8.1f} s{extra}, training {1000 * train:.1f} ms an epoch; top-1 final "
              f"{report['final']['top1']:.2f} best {report['best']['top1']:.2f}; top-5 {report['final']['top5']:.2f}")
    if args.cached_only:
        return
    t_faithful, r_faithful = runs["faithful"]
    t_cached, r_cached = runs["cached"]
    t_warm = runs["cached (warm cache)"][0]
    print(f"  speed-up cached vs faithful: {t_faithful / t_cached:.1f}x (cold cache), "
          f"{t_faithful / t_warm:.1f}x (warm cache); target >= 10x")
    per_faithful = t_faithful / args.epochs
    per_cached = (t_cached - r_cached["feature_seconds"]) / args.epochs
    full = 100 * per_faithful / (r_cached["feature_seconds"] + 100 * per_cached)
    print(f"  projected to the protocol's 100 epochs (per-epoch times above): {full:.0f}x with a cold cache")
    d_final = r_cached["final"]["top1"] - r_faithful["final"]["top1"]
    d_best = r_cached["best"]["top1"] - r_faithful["best"]["top1"]
    print(f"  top-1 difference (cached - faithful): final {d_final:+.2f}, best {d_best:+.2f} points")


if __name__ == "__main__":
    main()
