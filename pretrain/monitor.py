"""kNN monitor: weighted kNN accuracy of the current encoder, so learning shows without a linear probe."""

from __future__ import annotations

import torch
from torch import nn

from moco_transfer.augment import eval_transform
from moco_transfer.backbone import ResNetTrunk
from moco_transfer.data import make_datasets
from moco_transfer.features import extract_features, feature_loader
from moco_transfer.knn import topk_accuracy, weighted_knn_predict

from .config import PretrainConfig


class KnnMonitor:
    """Memory bank from the labelled train split, queries from val; datasets are built once per run."""

    def __init__(self, cfg: PretrainConfig, device: torch.device) -> None:
        transform = eval_transform(cfg.image_size)
        pair = make_datasets(cfg.knn_data or cfg.data, transform, transform, cfg.image_size, data_root=cfg.data_root)
        self.data_name = pair.root
        self.num_classes = len(pair.classes)
        self.k, self.t, self.device = cfg.knn_k, cfg.knn_t, device
        workers = min(cfg.workers, 4)
        self.train_loader = feature_loader(pair.train, workers=workers, device=device)
        self.val_loader = feature_loader(pair.val, workers=workers, device=device)

    def __call__(self, encoder: nn.Module) -> float:
        """Top-1 (%) of the encoder's avgpool features; the encoder's projection head is not used."""
        trunk = ResNetTrunk(encoder)
        bank, bank_labels = extract_features(trunk, self.train_loader, self.device, progress="kNN bank")
        queries, labels = extract_features(trunk, self.val_loader, self.device, progress="kNN queries")
        scores = weighted_knn_predict(bank.to(self.device), bank_labels.to(self.device), queries.to(self.device),
                                      self.num_classes, k=self.k, temperature=self.t)
        return topk_accuracy(scores.cpu(), labels, ks=(1,))[1]
