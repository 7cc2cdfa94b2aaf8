"""Datasets: ImageNet-style class folders that survive corrupt files, and the embedded digits set."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jfif")


class DataError(ValueError):
    """A data folder that cannot be used as given; the message names the folder and what was expected."""


def resolve_split(root: str | os.PathLike, split: str | None, required: bool = False) -> Path:
    """`root/split` when it exists; otherwise `root` itself, unless the split is required."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: folder not found (expected class subfolders, or train/ and val/)")
    if split is None:
        return root
    if (root / split).is_dir():
        return root / split
    if required:
        raise DataError(f"--data {root}: no {split}/ folder (expected {root}/{split}/<class>/<image>)")
    return root


def scan_class_folders(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes are the sorted subfolder names; samples are their image files, recursively."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            for fname in sorted(filenames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), index))
    if not samples:
        raise DataError(f"{root}: no images in its {len(classes)} class folders (extensions {IMG_EXTENSIONS})")
    return classes, samples


class ImageFolderDataset(torch.utils.data.Dataset):
    """Class-folder images; an unreadable file is replaced by the next readable one and reported.

    Items are `(sample, target, bad_paths)`: replacing instead of dropping keeps every batch full, which the
    queue arithmetic of MoCo needs; `bad_paths` lets the main process count and report what was skipped.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.classes, self.samples = scan_class_folders(self.root)
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> Image.Image:
        with open(self.samples[index][0], "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")

    def __getitem__(self, index: int) -> tuple[Any, int, tuple[str, ...]]:
        bad: list[str] = []
        for attempt in range(min(len(self), 64)):
            i = (index + attempt) % len(self)
            try:
                image = self.load(i)
            except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three on broken files
                bad.append(f"{self.samples[i][0]} ({type(exc).__name__}: {exc})")
                continue
            sample = self.transform(image) if self.transform else image
            return sample, self.samples[i][1], tuple(bad)
        raise DataError(f"{self.root}: 64 consecutive unreadable images from index {index}: {bad[:3]} ...")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 1,797 handwritten digits as RGB images (no download); a fixed stratified split.

    `split` is "train" (80%), "val" (20%) or "all"; images are upscaled from 8x8 to `image_size`.
    """

    def __init__(self, split: str = "train", transform: Callable | None = None, image_size: int = 32) -> None:
        from sklearn.model_selection import train_test_split

        images, labels = digits_arrays()
        if split not in ("train", "val", "all"):
            raise ValueError(f"digits split {split!r}: expected train, val or all")
        if split != "all":
            idx_train, idx_val = train_test_split(
                np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
            keep = np.sort(idx_train if split == "train" else idx_val)
            images, labels = images[keep], labels[keep]
        self.root = Path(f"<embedded digits:{split}>")
        self.images = [Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC).convert("RGB")
                       for im in images]
        self.targets = labels.tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, tuple[str, ...]]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index], ()


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


def collate_with_skips(batch: Sequence[tuple[Any, int, tuple[str, ...]]]) -> tuple[Any, torch.Tensor, list[str]]:
    """Default collation of samples and targets; the bad paths of the batch are passed through as a list."""
    samples = torch.utils.data.default_collate([b[0] for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
    bad = [p for b in batch for p in b[2]]
    return samples, targets, bad
