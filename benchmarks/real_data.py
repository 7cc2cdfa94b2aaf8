"""Fashion-MNIST: MoCo pretraining with the `fashion-mnist` preset, measured against the published baselines.

Pretrains the `fashion-mnist` preset on Fashion-MNIST's 60,000 training images (labels unused), then scores the
encoder on the 10,000 test images with the training images as gallery and training set:

- weighted kNN, k 20 and 200 (moco_transfer.eval.knn: exp(cos / T) votes, T 0.07, avgpool features);
- the linear probe on cached centre-crop features (moco_transfer.eval.linear, mode `cached`: SGD, 100 epochs,
  x0.1 at 60 and 80; lr from the preset's PRESET_LINEAR entry if it has one, else the protocol's 30 per 256);
- the same encoder with random weights (kNN k 20 and 200), and kNN on raw pixels: the published table's
  protocol (pixels standardised per pixel with the training set's mean and std, k 5, weights 1 / distance,
  L1 and L2), computed with this project's vote (moco_transfer.knn); the L2 search is its exact inner-product
  search, the L1 distances come from torch.cdist in chunks (the project's search has no L1).

It prints a Markdown table with the published rows and their sources, and writes OUTPUT/real_data.json (every
figure, the command, the machine, wall time per phase), OUTPUT/real_data.md (the table) and, from the
pretraining, OUTPUT/pretrain/curves.png. The cheap phases (raw pixels, random weights) run first, so that a
problem shows before the long pretraining.

    python benchmarks/real_data.py                                  # the full run (hours on 2 CPU cores)
    python benchmarks/real_data.py --max-train 5000 --epochs 1      # a quick check on a subset
    python benchmarks/real_data.py --resume                         # continue a stopped pretraining
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from moco_transfer.checkpoint import atomic_save, with_module_prefix
from moco_transfer.data import DataError
from moco_transfer.eval.knn import KnnConfig, run_knn
from moco_transfer.eval.linear import LinearConfig, run_linear
from moco_transfer.fileio import write_json_atomic
from moco_transfer.knn import knn_vote, search_neighbours, topk_accuracy
from moco_transfer.markdown import table
from moco_transfer.named_sets import data_defaults, load_named_split
from moco_transfer.pretrain.config import PretrainConfig, resolve_config
from moco_transfer.pretrain.engine import CURVES_NAME, build_model, claim_output, run_pretraining
from moco_transfer.progress import progress

PRESET = "fashion-mnist"
DATA = "fashion-mnist"
ENCODER_KS = (20, 200)
ENCODER_T = KnnConfig().temperature  # the kNN evaluator's default, 0.07
PIXEL_K = 5
PAPER = "Xiao, Rasul and Vollgraf 2017, arXiv:1708.07747, Table 3"
REPO_TABLE = "github.com/zalandoresearch/fashion-mnist, README benchmark table"


@dataclass(frozen=True)
class Published:
    """A published Fashion-MNIST test accuracy and where it is printed."""

    method: str
    top1: float
    source: str


PUBLISHED = (
    Published("raw pixels, kNN k 5, distance-weighted, L1", 85.4, PAPER),
    Published("raw pixels, kNN k 5, distance-weighted, L2", 85.2, PAPER),
    Published("logistic regression on pixels", 84.2, PAPER),
    Published("MLP on pixels", 87.1, PAPER),
    Published("SVC, RBF kernel, C 10, on pixels", 89.7, PAPER),
    Published("ResNet-18, supervised", 94.9, REPO_TABLE),
)


@dataclass
class BenchOptions:
    """What one benchmark run does; `pretrain_overrides` and `linear_epochs` exist for the smoke test."""

    output: Path = Path("runs/real_data")
    data_root: str | None = None
    epochs: int | None = None  # None: the preset's
    max_train: int | None = None
    threads: int | None = None
    resume: bool = False
    workers: int = 1  # loader workers of the evaluators' feature extraction
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    linear_epochs: int | None = None  # None: the preset's PRESET_LINEAR entry, else the protocol's 100
    command: str = ""


T = TypeVar("T")


class Phases:
    """Wall time of each phase, printed as it ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        result = fn()
        self.seconds[name] = round(time.perf_counter() - start, 2)
        print(f"== {name}: {self.seconds[name]:.1f} s", flush=True)
        return result


# ----------------------------------------------------------------------------------------------- data


def idx_bytes(array: np.ndarray) -> bytes:
    """An uint8 IDX file: two zero bytes, type 0x08, the rank, each size as a big-endian uint32, the data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_subset_root(source_root: str | None, max_train: int, folder: Path) -> Path:
    """A data root whose Fashion-MNIST holds the first `max_train` training images and the whole test set.

    Everything downstream (the preset's pretraining, the evaluators) then reads it as the named set, unchanged.
    """
    raw = folder / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train = load_named_split(DATA, "train", source_root)
    test = load_named_split(DATA, "test", source_root)
    if max_train > len(train.images):
        raise DataError(f"--max-train {max_train}: the training set has only {len(train.images)} images")
    for name, array in (("train-images-idx3-ubyte", train.images[:max_train, 0]),
                        ("train-labels-idx1-ubyte", train.targets[:max_train].astype(np.uint8)),
                        ("t10k-images-idx3-ubyte", test.images[:, 0]),
                        ("t10k-labels-idx1-ubyte", test.targets.astype(np.uint8))):
        (raw / name).write_bytes(idx_bytes(np.ascontiguousarray(array)))
    return folder


def pixel_arrays(root: str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test pixels (N, 784) uint8 and their labels, as the named-set reader gives them."""
    train, test = load_named_split(DATA, "train", root), load_named_split(DATA, "test", root)
    return (torch.from_numpy(train.images.reshape(len(train.images), -1).copy()), torch.from_numpy(train.targets),
            torch.from_numpy(test.images.reshape(len(test.images), -1).copy()), torch.from_numpy(test.targets))


# ----------------------------------------------------------------------------------------------- raw pixels


def standardise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel with the training set's mean and (population) std, float64, as the published table's runner
    does with scikit-learn's StandardScaler; a pixel constant over the training set keeps scale 1."""
    train, test = train.to(torch.float64), test.to(torch.float64)
    mean, std = train.mean(dim=0), train.std(dim=0, correction=0)
    std = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
    return (train - mean) / std, (test - mean) / std


def distance_weighted_scores(distances: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int
                             ) -> torch.Tensor:
    """Class scores with scikit-learn's weights="distance" through the project's vote (weights exp(s / T)).

    s = -log(d) and T = 1 give the weight 1 / d. A query with a neighbour at distance 0 counts only those
    neighbours, one vote each (scikit-learn's rule), so an exact duplicate does not make an infinite score.
    """
    exact = distances == 0
    has_exact = exact.any(dim=1, keepdim=True)
    log_weight = torch.where(has_exact, torch.where(exact, 0.0, -math.inf), -distances.clamp_min(1e-300).log())
    return knn_vote(log_weight, neighbour_labels, num_classes, temperature=1.0)


def l2_neighbours(gallery: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact L2 neighbours with the project's inner-product search, in float64.

    |q - g|^2 = |q|^2 - 2 (q.g - |g|^2 / 2): the largest inner product of [q, 1] with [g, -|g|^2 / 2] is the
    nearest g. The torch backend keeps float64 (FAISS would cast to float32).
    """
    half_norms = gallery.pow(2).sum(dim=1, keepdim=True) / 2
    sims, idx, _ = search_neighbours(torch.cat([gallery, -half_norms], dim=1),
                                     torch.cat([queries, torch.ones(len(queries), 1, dtype=queries.dtype)], dim=1),
                                     k, backend="torch", batch_size=256)
    squared = (queries.pow(2).sum(dim=1, keepdim=True) - 2 * sims).clamp_min(0)
    return squared.sqrt(), idx


def l1_neighbours(gallery: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact L1 neighbours: torch.cdist(p=1) on `chunk` queries at a time (the slowest phase: minutes)."""
    k = min(k, len(gallery))
    dists, idx = [], []
    starts = range(0, len(queries), chunk)
    for start in progress(starts, desc="raw pixels, L1", unit="chunk", dynamic_ncols=True):
        d, i = torch.cdist(queries[start:start + chunk], gallery, p=1).topk(k, dim=1, largest=False)
        dists.append(d)
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def raw_pixel_knn(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  k: int = PIXEL_K, num_classes: int = 10) -> dict[str, float]:
    """Top-1 (%) of distance-weighted kNN on standardised pixels, L1 and L2 (the published table's protocol)."""
    gallery, queries = standardise(train_x, test_x)
    out = {}
    for metric, search in (("L1", l1_neighbours), ("L2", l2_neighbours)):
        distances, idx = search(gallery, queries, k)
        scores = distance_weighted_scores(distances, train_y[idx], num_classes)
        out[metric] = topk_accuracy(scores, test_y, ks=(1,))[1]
    return out


# ----------------------------------------------------------------------------------------------- encoders


def write_random_checkpoint(cfg: PretrainConfig, path: Path) -> Path:
    """The preset's model with its seeded random initial weights, as a checkpoint the evaluators read."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"epoch": 0, "arch": cfg.arch, "state_dict": with_module_prefix(model.state_dict()),
                 "config": cfg.to_dict()}, path)
    return path


def encoder_knn(checkpoint: Path, output: Path, workers: int, cache_dir: Path | None) -> dict[str, Any]:
    """The project's kNN evaluator at k 20 and 200 (T 0.07, its default) on the checkpoint's own named set."""
    return run_knn(checkpoint, output, cfg=KnnConfig(ks=ENCODER_KS, temperature=ENCODER_T, workers=workers),
                   cache_dir=cache_dir, use_cache=cache_dir is not None)


def linear_probe(checkpoint: Path, output: Path, workers: int, cache_dir: Path, epochs: int | None
                 ) -> dict[str, Any]:
    """The project's linear probe on cached centre-crop features (the kNN phase has cached them)."""
    return run_linear(checkpoint, output, cfg=LinearConfig(mode="cached", workers=workers, epochs=epochs),
                      cache_dir=cache_dir)


# ----------------------------------------------------------------------------------------------- report


def table_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """This run's rows, then the published ones; every row: method, top-1, protocol, source."""
    run = f"this run ({figures['epochs']} epochs, {figures['num_train']} training images)"
    rows = []
    for k in ENCODER_KS:
        rows.append({"method": f"MoCo, `{PRESET}` preset, kNN k {k}", "top1": figures["knn"][str(k)],
                     "protocol": f"weighted kNN (T {ENCODER_T:g}) on avgpool features", "source": run})
    lin = figures["linear"]
    rows.append({"method": f"MoCo, `{PRESET}` preset, linear probe", "top1": lin["top1"],
                 "protocol": f"cached features, SGD {lin['epochs']} epochs, lr {lin['lr']:g}, final epoch",
                 "source": run})
    for k in ENCODER_KS:
        rows.append({"method": f"same encoder, random weights, kNN k {k}", "top1": figures["random_knn"][str(k)],
                     "protocol": f"weighted kNN (T {ENCODER_T:g}) on avgpool features", "source": run})
    for metric in ("L1", "L2"):
        rows.append({"method": f"raw pixels, kNN k {PIXEL_K}, distance-weighted, {metric}",
                     "top1": figures["raw_pixels"][metric],
                     "protocol": "standardised pixels, weights 1 / distance", "source": run})
    for p in PUBLISHED:
        rows.append({"method": p.method, "top1": p.top1, "protocol": "published", "source": p.source})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as real_data.md shows them."""
    return "\n".join(table(["method", "top-1 (%)", "protocol", "source"],
                           ([r["method"], f"{r['top1']:.2f}", r["protocol"], r["source"]] for r in rows)))


def machine() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_count": os.cpu_count(), "cpus_usable": cores, "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------------------------- the run


def run_benchmark(opts: BenchOptions) -> dict[str, Any]:
    """Every phase in order; returns the report that goes to real_data.json."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = opts.output
    out.mkdir(parents=True, exist_ok=True)
    phases = Phases()
    root = opts.data_root
    if opts.max_train:
        root = str(phases.run("subset", lambda: write_subset_root(opts.data_root, opts.max_train, out / "data")))
    overrides = {**opts.pretrain_overrides, "data_root": root, "output": str(out / "pretrain"),
                 "epochs": opts.epochs}
    cfg = resolve_config(PRESET, overrides=overrides)
    claim_output(Path(cfg.output), "auto" if opts.resume else None, force=False)  # refused now, not in phase 3
    cache = out / "features"
    with data_defaults(root=root):
        train_x, train_y, test_x, test_y = pixel_arrays(root)
        raw = phases.run("raw-pixel kNN", lambda: raw_pixel_knn(train_x, train_y, test_x, test_y))
        random_ckpt = write_random_checkpoint(cfg, out / "random_init" / "checkpoint_random.pth.tar")
        random_knn = phases.run("random-weights kNN", lambda: encoder_knn(random_ckpt, out / "random_init",
                                                                          opts.workers, None))
        summary = phases.run("pretrain", lambda: run_pretraining(cfg, resume="auto" if opts.resume else None))
        checkpoint = Path(summary["checkpoint"])
        knn = phases.run("kNN", lambda: encoder_knn(checkpoint, out / "knn", opts.workers, cache))
        linear = phases.run("linear probe", lambda: linear_probe(checkpoint, out / "linear", opts.workers, cache,
                                                                opts.linear_epochs))
    last = summary.get("last") or {}
    figures = {
        "epochs": cfg.epochs, "num_train": len(train_y), "num_test": len(test_y),
        "knn": {k: v["top1"] for k, v in knn["knn"].items()},
        "knn_top5": {k: v["top5"] for k, v in knn["knn"].items()},
        "knn_retrieval": knn["retrieval"],
        "random_knn": {k: v["top1"] for k, v in random_knn["knn"].items()},
        "linear": {"top1": linear["final"]["top1"], "top5": linear["final"]["top5"], "best": linear["best"],
                   "epochs": linear["hyperparameters"]["epochs"], "lr": linear["hyperparameters"]["lr"],
                   "settings": linear["settings"], "warnings": linear["warnings"],
                   "features_from_cache": linear.get("features_from_cache")},
        "raw_pixels": raw,
        "pretrain_last_epoch": {k: last.get(k) for k in ("loss", "acc1", "images_per_s")},
    }
    rows = table_rows(figures)
    table = markdown_table(rows)
    report = {
        "benchmark": "Fashion-MNIST: MoCo (fashion-mnist preset) against random weights, raw pixels and the "
                     "published baselines; test split scored against the training split",
        "command": opts.command, "machine": machine(), "preset": asdict(cfg), "figures": figures, "rows": rows,
        "published_sources": {"paper": PAPER, "repository": REPO_TABLE},
        "seconds": {**phases.seconds, "total": round(sum(phases.seconds.values()), 2)},
        "files": {"curves_png": str(out / "pretrain" / CURVES_NAME), "checkpoint": str(checkpoint),
                  "pretrain_log": str(out / "pretrain" / "log.jsonl"), "knn": str(out / "knn" / "knn.json"),
                  "linear": str(out / "linear" / "linear.json"),
                  "random_init_knn": str(out / "random_init" / "knn.json")},
        "pretrain_epochs": [json.loads(line) for line in
                            (out / "pretrain" / "log.jsonl").read_text().splitlines() if line],
    }
    write_json_atomic(report, out / "real_data.json", default=str)
    (out / "real_data.md").write_text(table + "\n")
    print()
    print(table)
    print()
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()))
    print(f"report: {out / 'real_data.json'}; table: {out / 'real_data.md'}; curves: {report['files']['curves_png']}")
    return report


def parse_args(argv: list[str] | None = None) -> BenchOptions:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="Where Fashion-MNIST is (as `moco pretrain --data-root`; default "
                                            "$MOCO_DATA_ROOT, else ~/.cache/moco_transfer/datasets, else Debian's "
                                            "/usr/share/datasets/fashion-mnist).")
    parser.add_argument("--epochs", type=int, help="Pretraining epochs (default: the preset's).")
    parser.add_argument("--output", "-o", type=Path, default=Path("runs/real_data"),
                        help="Folder of the run and its report (default runs/real_data).")
    parser.add_argument("--max-train", type=int, help="Use only the first N training images (a quick check).")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core).")
    parser.add_argument("--resume", action="store_true", help="Continue the pretraining in OUTPUT/pretrain.")
    parser.add_argument("--workers", type=int, default=1, help="Loader workers of the evaluators (default 1).")
    args = parser.parse_args(argv)
    if args.max_train is not None and args.max_train < 1:
        parser.error("--max-train: expected a positive number of images")
    return BenchOptions(output=args.output, data_root=args.data_root, epochs=args.epochs, max_train=args.max_train,
                        threads=args.threads, resume=args.resume, workers=args.workers,
                        command=" ".join([Path(sys.executable).name, *sys.argv]))


def main(argv: list[str] | None = None) -> None:
    from moco_transfer.pretrain.config import ConfigError

    try:
        run_benchmark(parse_args(argv))
    except (ConfigError, DataError) as exc:  # a folder holding a run, missing files: one line, not a traceback
        sys.exit(f"error: {exc}\n(this benchmark: --resume continues the run in OUTPUT/pretrain; or give "
                 f"another --output)")


if __name__ == "__main__":
    main()
