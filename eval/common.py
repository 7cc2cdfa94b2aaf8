"""What both evaluators share: the train/val pair of datasets and their (cached) backbone features."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moco_transfer.augment import eval_transform
from moco_transfer.data import DataError, DigitsDataset, ImageFolderDataset, resolve_split
from moco_transfer.feature_cache import FeatureCache, cache_key, samples_signature
from moco_transfer.features import extract_features, feature_loader
from moco_transfer.pretrained import PretrainedBackbone


@dataclass
class SplitPair:
    """Train and val datasets with one class list; `root` is what goes into cache keys and reports."""

    train: Any
    val: Any
    classes: list[str]
    root: str


def make_datasets(data: str | os.PathLike | None, train_transform: Any, val_transform: Any, image_size: int
                  ) -> SplitPair:
    """`--data DIR` with train/ and val/ class folders, or the embedded digits when `data` is None."""
    if data is None:
        return SplitPair(DigitsDataset("train", train_transform, image_size),
                         DigitsDataset("val", val_transform, image_size),
                         [str(c) for c in range(10)], f"<embedded digits {image_size}px>")
    root = Path(data)
    train = ImageFolderDataset(resolve_split(root, "train", required=True), train_transform)
    val = ImageFolderDataset(resolve_split(root, "val", required=True), val_transform)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"--data {root}: train/ and val/ must have the same class folders "
                        f"(only in train: {only_train[:10]}, only in val: {only_val[:10]})")
    return SplitPair(train, val, train.classes, str(root.resolve()))


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class FeatureSplits:
    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    from_cache: dict[str, bool]
    bad_paths: list[str]


def backbone_features(pb: PretrainedBackbone, pair: SplitPair, device: torch.device, batch_size: int = 256,
                      workers: int = 2, cache: FeatureCache | None = None) -> FeatureSplits:
    """Raw avgpool features of train and val under the evaluation transform, from the cache when present."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    from_cache: dict[str, bool] = {}
    bad: list[str] = []
    pb.model.to(device)
    for split, dataset in (("train", pair.train), ("val", pair.val)):
        def compute(dataset: Any = dataset, split: str = split) -> tuple[torch.Tensor, torch.Tensor]:
            loader = feature_loader(dataset, batch_size, workers, device)
            return extract_features(pb.model, loader, device, normalize=False,
                                    progress=f"features {split}", bad_paths=bad)
        if cache is None:
            out[split], from_cache[split] = compute(), False
            continue
        key = cache_key(pb.fingerprint, pair.root, split, dataset.transform, samples_signature(dataset))
        hits = cache.hits
        out[split] = cache.get_or_compute(key, compute)
        from_cache[split] = cache.hits > hits
    return FeatureSplits(*out["train"], *out["val"], from_cache=from_cache, bad_paths=bad)


def default_eval_transform(pb: PretrainedBackbone) -> Any:
    return eval_transform(pb.image_size)
