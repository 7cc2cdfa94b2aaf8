"""kNN evaluation of a frozen MoCo backbone: weighted-vote classification and class-label retrieval.

Features are the backbone's avgpool outputs of center crops, L2-normalised; the search is exact inner product
with FAISS (GPU index when FAISS sees a GPU), queries in batches so memory stays bounded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moco_transfer.augment import eval_transform
from moco_transfer.data import make_datasets
from moco_transfer.distributed import pick_device
from moco_transfer.feature_cache import FeatureCache
from moco_transfer.fileio import write_json_atomic
from moco_transfer.knn import knn_classification, mean_average_precision, recall_at_k, search_neighbours
from moco_transfer.pretrained import load_pretrained_backbone
from moco_transfer.run_log import MonitorOptions, RunLog

from .common import backbone_features
from .plots import save_gallery


@dataclass
class KnnConfig:
    """k values voted at once from one search; T 0.07 as InstDisc/DINO; recall@ks; mAP over the full gallery
    unless `map_depth` truncates it (needed only for very large galleries)."""

    ks: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    recall_ks: tuple[int, ...] = (1, 5, 10)
    map_depth: int | None = None
    backend: str = "auto"
    query_batch: int = 4096
    batch_size: int = 256
    workers: int = 2
    gallery_queries: int = 8
    gallery_neighbours: int = 8


def _raw_image(dataset: Any, index: int) -> Any:
    """The untransformed image of a sample, for the gallery picture."""
    if hasattr(dataset, "images"):
        return dataset.images[index]
    return dataset.load(index)


def write_gallery(pair: Any, sims: torch.Tensor, idx: torch.Tensor, cfg: KnnConfig, path: Path) -> Path | None:
    """Evenly spaced validation queries and their nearest training images, one row each."""
    n = min(cfg.gallery_queries, len(pair.val))
    if n == 0 or cfg.gallery_neighbours == 0:
        return None
    rows = torch.linspace(0, len(pair.val) - 1, n).round().long().tolist()
    m = min(cfg.gallery_neighbours, idx.shape[1])
    val_targets, train_targets = pair.val.targets, pair.train.targets
    return save_gallery(
        [_raw_image(pair.val, r) for r in rows], [pair.classes[val_targets[r]] for r in rows],
        [[_raw_image(pair.train, int(j)) for j in idx[r, :m]] for r in rows],
        [[pair.classes[train_targets[int(j)]] for j in idx[r, :m]] for r in rows],
        [sims[r, :m].tolist() for r in rows], path)


def run_knn(checkpoint: str | os.PathLike, output: str | os.PathLike, data: str | os.PathLike | None = None,
            cfg: KnnConfig | None = None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
            device: str | None = None, monitors: MonitorOptions | None = None) -> dict[str, Any]:
    """Evaluate `checkpoint`; writes knn.json and knn_gallery.png to `output` (and its figures to TensorBoard /
    W&B at step 0, as `monitors` say) and returns the report."""
    cfg = cfg or KnnConfig()
    monitors = monitors or MonitorOptions()
    monitors.check()
    if not cfg.ks or min(cfg.ks) < 1 or not cfg.recall_ks or min(cfg.recall_ks) < 1:
        raise ValueError(f"--k {cfg.ks} / recall ks {cfg.recall_ks}: expected positive integers")
    if cfg.temperature <= 0:
        raise ValueError(f"--temperature {cfg.temperature}: expected > 0")
    t0 = time.perf_counter()
    dev = pick_device(device)  # as linear's: this rank's GPU under torchrun
    pb = load_pretrained_backbone(checkpoint, dev)
    transform = eval_transform(pb.image_size)
    pair = make_datasets(data or pb.embedded_data, transform, transform, pb.image_size)
    cache = FeatureCache(cache_dir) if use_cache else None
    feats = backbone_features(pb, pair, dev, cfg.batch_size, cfg.workers, cache)
    t_feat = time.perf_counter() - t0
    train_f, val_f = F.normalize(feats.train_features, dim=1), F.normalize(feats.val_features, dim=1)
    train_l, val_l = feats.train_labels, feats.val_labels
    k_max = max(*cfg.ks, *cfg.recall_ks, cfg.gallery_neighbours)
    t1 = time.perf_counter()
    sims, idx, backend = search_neighbours(train_f, val_f, k_max, cfg.backend, cfg.query_batch)
    t_search = time.perf_counter() - t1
    neighbour_labels = train_l[idx]
    warnings = [f"k={k} exceeds the {len(train_l)} gallery images: every gallery image votes"
                for k in cfg.ks if k > len(train_l)]
    effective = {k: min(k, idx.shape[1]) for k in cfg.ks}
    voted = knn_classification(sims, neighbour_labels, val_l, len(pair.classes), tuple(sorted(set(effective.values()))),
                               cfg.temperature)
    classification = {k: voted[effective[k]] for k in cfg.ks}
    recall = recall_at_k(neighbour_labels, val_l, cfg.recall_ks)
    mean_ap, scored = mean_average_precision(train_f, train_l, val_f, val_l, depth=cfg.map_depth,
                                             progress="mAP")
    if not scored:  # mAP NaN, written as null
        warnings.append("mAP: no validation query has a same-class image in the gallery (queries_scored 0)")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    gallery = write_gallery(pair, sims, idx, cfg, out / "knn_gallery.png")
    report = {
        "protocol": "weighted kNN (exp(cos / T) votes) and class-label retrieval on L2-normalised avgpool features",
        "checkpoint": str(pb.path.resolve()), "checkpoint_sha256": pb.fingerprint, "arch": pb.arch,
        "epoch": pb.epoch, "image_size": pb.image_size, "small_images": pb.small_images, "data": pair.root,
        "num_classes": len(pair.classes), "num_train": len(pair.train), "num_val": len(pair.val),
        "feature_dim": int(train_f.shape[1]),
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "search_backend": backend,
        "knn": {str(k): v for k, v in classification.items()},
        "retrieval": {**{f"recall@{k}": v for k, v in recall.items()},
                      ("mAP" if cfg.map_depth is None else f"mAP@{cfg.map_depth}"): mean_ap,
                      "queries_scored": scored},
        "features_from_cache": feats.from_cache, "skipped_files": len(feats.bad_paths),
        "seconds": {"features": t_feat, "search": t_search, "total": time.perf_counter() - t0},
        "gallery": str(gallery) if gallery else None, "device": str(dev), "warnings": warnings,
    }
    write_json_atomic(report, out / "knn.json")
    with RunLog(out, monitors, name=f"knn {out.name}", config=report["hyperparameters"]) as run_log:
        for k, acc in classification.items():
            run_log.scalars(acc, 0, prefix=f"knn/k{k}_")
        run_log.scalars(report["retrieval"], 0, prefix="retrieval/")
    return report


def parse_ks(values: Sequence[int] | str) -> tuple[int, ...]:
    """`10,20,100,200` or repeated options into a sorted tuple of distinct positive k."""
    items = values.split(",") if isinstance(values, str) else values
    ks = sorted({int(v) for v in items})
    if not ks or ks[0] < 1:
        raise ValueError(f"k values {values!r}: expected positive integers")
    return tuple(ks)
