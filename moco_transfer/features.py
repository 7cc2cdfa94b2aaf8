"""Frozen-backbone feature extraction shared by the kNN monitor and the evaluators."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import collate_with_skips
from .progress import progress as progress_bar
from .signals import loader_worker_init, shut_down_workers


def feature_loader(dataset: torch.utils.data.Dataset, batch_size: int = 256, workers: int = 2,
                   device: torch.device | None = None) -> torch.utils.data.DataLoader:
    """In-order, full loader (no shuffle, no drop) so features line up with the dataset's targets.

    Its workers outlive a stop signal sent to the whole job (`loader_worker_init`): the kNN monitor runs inside
    pretraining, whose main process saves and exits on that signal, and a dead worker would raise instead.
    """
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=workers,
        pin_memory=device is not None and device.type == "cuda", collate_fn=collate_with_skips,
        persistent_workers=False, worker_init_fn=loader_worker_init())


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    normalize: bool = True,
    progress: str | None = None,
    bad_paths: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N x D, float32, on CPU) and labels of every sample in `loader`, backbone in eval mode.

    The loader yields (images, labels, ...) batches; the backbone's training mode is restored afterwards.
    Unreadable files that the dataset replaced (the batch's third item) are appended to `bad_paths`.
    The loader's workers are stopped on the way out, also when the backbone raises.
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    batches = iter(loader)
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = progress_bar(batches, desc=progress, total=total, leave=False, dynamic_ncols=True,
                       unit="batch") if progress else None
    seen, start = 0, time.perf_counter()
    try:
        for batch in bar if bar is not None else batches:
            images, targets = batch[0], batch[1]
            out = backbone(images.to(device, non_blocking=True)).float()
            feats.append((F.normalize(out, dim=1) if normalize else out).cpu())
            labels.append(torch.as_tensor(targets))
            if bad_paths is not None and len(batch) > 2:
                bad_paths.extend(batch[2])
            seen += images.shape[0]
            if bar is not None:
                bar.set_postfix(img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        shut_down_workers(batches)
        backbone.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches (empty dataset?)")
    return torch.cat(feats), torch.cat(labels)
