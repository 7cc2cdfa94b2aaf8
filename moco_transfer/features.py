"""Frozen-backbone feature extraction shared by the kNN monitor and the evaluators."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    normalize: bool = True,
    progress: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N x D, float32, on CPU) and labels of every sample in `loader`, backbone in eval mode.

    The loader yields (images, labels, ...) batches; the backbone's training mode is restored afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    batches = tqdm(loader, desc=progress, leave=False, dynamic_ncols=True) if progress else loader
    for batch in batches:
        images, targets = batch[0], batch[1]
        out = backbone(images.to(device, non_blocking=True)).float()
        feats.append((F.normalize(out, dim=1) if normalize else out).cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
