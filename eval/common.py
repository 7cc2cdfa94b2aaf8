"""What both evaluators share: the (cached) backbone features of a train/val pair of datasets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moco_transfer.augment import eval_transform
from moco_transfer.data import SplitPair
from moco_transfer.feature_cache import FeatureCache, cache_key, samples_signature
from moco_transfer.features import extract_features, feature_loader
from moco_transfer.pretrained import PretrainedBackbone


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
