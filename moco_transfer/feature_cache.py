"""Backbone features on disk (numpy .npz) so that a second evaluation of a checkpoint skips extraction.

The key hashes everything the features depend on: the checkpoint's bytes, the data root and split, the list
of samples (paths and labels), and the transform. Raw (unnormalised) avgpool features are stored; kNN
normalises on load, the linear probe uses them as they are.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_open

DEFAULT_CACHE_DIR = Path(os.environ.get("MOCO_CACHE_DIR", Path.home() / ".cache" / "moco_transfer" / "features"))


def samples_signature(dataset: Any) -> str:
    """Hash of the sample list (paths/targets) without touching the files: cheap even for ImageNet."""
    digest = hashlib.sha256()
    samples: Sequence[Any] | None = getattr(dataset, "samples", None)
    if samples is not None:
        for path, target in samples:
            digest.update(f"{path}\t{target}\n".encode())
    else:
        digest.update(json.dumps(list(getattr(dataset, "targets", []))).encode())
        digest.update(str(len(dataset)).encode())
    return digest.hexdigest()


def cache_key(checkpoint_fingerprint: str, data_root: str, split: str, transform: Any, signature: str) -> str:
    """Stable hex key of the inputs that determine a feature matrix."""
    parts = {"checkpoint": checkpoint_fingerprint, "root": str(data_root), "split": split,
             "transform": repr(transform), "samples": signature, "version": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class FeatureCache:
    """A folder of `<key>.npz` files holding `features` (float32) and `labels` (int64)."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder is not None else DEFAULT_CACHE_DIR
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                feats, labels = data["features"], data["labels"]
        except (OSError, ValueError, KeyError):
            return None  # a truncated or foreign file: recompute and overwrite
        return torch.from_numpy(feats.astype(np.float32, copy=False)), torch.from_numpy(labels.astype(np.int64))

    def save(self, key: str, features: torch.Tensor, labels: torch.Tensor) -> Path:
        """Atomic write (temporary file + rename) so an interrupted run never leaves a half file."""
        with atomic_open(self.path(key), "wb") as f:
            np.savez(f, features=features.cpu().numpy().astype(np.float32), labels=labels.cpu().numpy())
        return self.path(key)

    def get_or_compute(self, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        found = self.load(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        feats, labels = compute()
        self.save(key, feats, labels)
        return feats, labels
