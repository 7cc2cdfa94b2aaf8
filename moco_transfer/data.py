"""Datasets: ImageNet-style class folders that survive corrupt files, and the embedded sets (no download).

Named sets (cifar10, ...) are in named_sets.py, file lists and flat folders in file_lists.py.
"""

from __future__ import annotations

import functools
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

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, classes: list[str] | None = None,
                 samples: list[tuple[str, int]] | None = None) -> None:
        """`classes` and `samples` given: a list scanned elsewhere (a file list, a flat folder, rank 0's scan)."""
        self.root = Path(root)
        if samples is None:
            self.classes, self.samples = scan_class_folders(self.root)
        else:
            self.classes, self.samples = list(classes or []), samples
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


@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 images and labels, read once per process (read-only arrays)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """The embedded sets' fixed stratified split: 80% train, 20% val, or all; the same digits in both sets.

    "pretrain" is the train digits, as a set draws them for pretraining (see ScatteredDigitsDataset).
    """
    from sklearn.model_selection import train_test_split

    if split not in ("train", "val", "all", "pretrain"):
        raise ValueError(f"embedded split {split!r}: expected train, val, all or pretrain")
    if split == "pretrain":
        split = "train"
    if split == "all":
        return np.arange(len(labels))
    idx_train, idx_val = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    return np.sort(idx_train if split == "train" else idx_val)


class InMemoryDataset(torch.utils.data.Dataset):
    """PIL images held in memory, with the `(sample, target, bad_paths)` items of ImageFolderDataset."""

    images: list[Image.Image]
    targets: list[int]
    classes: list[str]
    root: Path
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, tuple[str, ...]]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), self.targets[index], ()


class DigitsDataset(InMemoryDataset):
    """scikit-learn's 1,797 handwritten digits as RGB images (no download); a fixed stratified split.

    `split` is "train" (80%), "val" (20%) or "all"; images are upscaled from 8x8 to `image_size`. Centred and
    clean, they are easy for any features: a random-weights ResNet already reaches about 94% kNN top-1.
    """

    def __init__(self, split: str = "train", transform: Callable | None = None, image_size: int = 32) -> None:
        images, labels = digits_arrays()
        keep = split_indices(labels, split)
        self.root = Path(f"<embedded digits:{split}>")
        self.images = [Image.fromarray(im).resize((image_size, image_size), Image.BICUBIC).convert("RGB")
                       for im in images[keep]]
        self.targets = labels[keep].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform


@dataclass(frozen=True)
class SceneStyle:
    """How a scattered digit is drawn: its scale range and the colours that aug+ randomises anyway.

    Every per-image factor of the evaluation drawings is one that MoCo's views vary: position and scale
    (RandomResizedCrop), brightness/contrast/saturation within ColorJitter's 0.4 and hue within its 0.1,
    grayscale with p 0.2. No mirror (`flip` 0): a mirrored digit is another glyph, and the preset's views do
    not mirror either. Pixels, and random-weights features, are dominated by these factors rather than by
    the digit's shape. Pretraining sees the canonical drawing instead: the glyph centred at
    `canonical_scale` of the canvas in the base colours, so the only thing that tells two training images
    apart is the digit's own shape and no per-image nuisance can serve MoCo as a shortcut.
    """

    scale: tuple[float, float] = (0.4, 1.0)         # glyph side as a fraction of the canvas, log-uniform
    foreground: tuple[int, int, int] = (255, 200, 60)
    background: tuple[int, int, int] = (30, 60, 140)
    jitter: float = 0.4                              # brightness, contrast, saturation factors in 1 +- jitter
    hue: float = 0.1
    grayscale: float = 0.2
    flip: float = 0.0
    canonical_scale: float = 0.7                     # glyph side in the pretraining drawings


@dataclass(frozen=True)
class SceneParams:
    """Per-image random factors of a scattered-digits drawing (arrays of length n), drawn up front."""

    sides: np.ndarray      # glyph side in pixels
    corners: np.ndarray    # (n, 2) top-left (row, column) of the glyph
    factors: np.ndarray    # (n, 3) brightness, contrast, saturation
    hues: np.ndarray       # hue shift
    orders: np.ndarray     # (n, 4) order of the four colour ops (0 brightness, 1 contrast, 2 saturation, 3 hue)
    gray: np.ndarray       # bool: converted to grayscale
    flip: np.ndarray       # bool: mirrored left-right


def draw_scene_params(n: int, canvas: int, seed: int = 0, style: SceneStyle = SceneStyle()) -> SceneParams:
    rng = np.random.default_rng(seed)
    lo, hi = np.log(style.scale[0]), np.log(style.scale[1])
    sides = np.clip(np.rint(canvas * np.exp(rng.uniform(lo, hi, n))), 4, canvas).astype(int)
    return SceneParams(
        sides=sides,
        corners=(rng.random((n, 2)) * (canvas - sides + 1)[:, None]).astype(int),
        factors=rng.uniform(1 - style.jitter, 1 + style.jitter, (n, 3)),
        hues=rng.uniform(-style.hue, style.hue, n),
        orders=np.argsort(rng.random((n, 4)), axis=1),
        gray=rng.random(n) < style.grayscale,
        flip=rng.random(n) < style.flip,
    )


def canonical_params(n: int, canvas: int, style: SceneStyle = SceneStyle()) -> SceneParams:
    """The pretraining drawing's factors: glyph centred at `style.canonical_scale`, base colours, no mirror."""
    side = int(np.clip(round(canvas * style.canonical_scale), 4, canvas))
    return SceneParams(
        sides=np.full(n, side), corners=np.full((n, 2), (canvas - side) // 2), factors=np.ones((n, 3)),
        hues=np.zeros(n), orders=np.tile(np.arange(4), (n, 1)), gray=np.zeros(n, bool), flip=np.zeros(n, bool))


def jitter_colours(image: Image.Image, params: SceneParams, i: int) -> Image.Image:
    """Image i's colour factors, applied with torchvision's ops in its own order, as ColorJitter does."""
    from torchvision.transforms import functional as TF

    ops = (lambda im: TF.adjust_brightness(im, params.factors[i, 0]),
           lambda im: TF.adjust_contrast(im, params.factors[i, 1]),
           lambda im: TF.adjust_saturation(im, params.factors[i, 2]),
           lambda im: TF.adjust_hue(im, params.hues[i]))
    for op in params.orders[i]:
        image = ops[op](image)
    return TF.rgb_to_grayscale(image, num_output_channels=3) if params.gray[i] else image


def draw_digits(glyphs: np.ndarray, canvas: int, params: SceneParams, style: SceneStyle = SceneStyle()
                ) -> list[Image.Image]:
    """The clean drawings: each 8x8 glyph (values 0-255) at its scale and position, mirrored where drawn so."""
    fg = np.asarray(style.foreground, np.float32)
    bg = np.asarray(style.background, np.float32)
    images = []
    for i, glyph in enumerate(glyphs):
        side, (y0, x0) = params.sides[i], params.corners[i]
        ink = np.zeros((canvas, canvas, 1), np.float32)
        small = Image.fromarray(glyph).resize((side, side), Image.BICUBIC)
        ink[y0:y0 + side, x0:x0 + side, 0] = np.asarray(small, np.float32) / 255.0
        image = Image.fromarray(np.clip(ink * fg + (1 - ink) * bg + 0.5, 0, 255).astype(np.uint8))
        images.append(image.transpose(Image.FLIP_LEFT_RIGHT) if params.flip[i] else image)
    return images


def render_scattered_digits(glyphs: np.ndarray, canvas: int, seed: int = 0,
                            style: SceneStyle = SceneStyle()) -> list[Image.Image]:
    """Clean drawings with each image's colour jitter; deterministic for a seed (see `draw_scene_params`)."""
    params = draw_scene_params(len(glyphs), canvas, seed, style)
    return [jitter_colours(image, params, i) for i, image in enumerate(draw_digits(glyphs, canvas, params, style))]


@functools.lru_cache(maxsize=4)
def _scattered_drawings(canvas: int, seed: int, style: SceneStyle) -> tuple[Image.Image, ...]:
    """All digits drawn once per process: the train and val splits (and the kNN monitor's copies) share them."""
    return tuple(render_scattered_digits(digits_arrays()[0], canvas, seed, style))


class ScatteredDigitsDataset(InMemoryDataset):
    """The embedded default: scikit-learn's digits drawn at random scale and position on a coloured canvas.

    Made on the fly (no download; about a second). A random-weights ResNet's kNN top-1 drops from about 94%
    on the plain digits to about 28-33% here (seeds 0-2), so what pretraining learns shows. The split is the
    plain digits' (val digits are never in train); `seed` picks the drawing, not the split. The "pretrain"
    split holds the train digits' canonical drawings (see SceneStyle): MoCo's views must create the variation
    themselves.
    """

    def __init__(self, split: str = "train", transform: Callable | None = None, image_size: int = 32,
                 seed: int = 0, style: SceneStyle = SceneStyle()) -> None:
        glyphs, labels = digits_arrays()
        keep = split_indices(labels, split)
        self.root = Path(f"<embedded scattered-digits:{split}>")
        if split == "pretrain":
            self.images = draw_digits(glyphs[keep], image_size, canonical_params(len(keep), image_size, style), style)
        else:
            drawings = _scattered_drawings(image_size, seed, style)
            self.images = [drawings[i] for i in keep]
        self.targets = labels[keep].tolist()
        self.classes = [str(c) for c in range(10)]
        self.transform = transform


EMBEDDED_PREFIX = "embedded:"
EMBEDDED_SETS: dict[str, type[InMemoryDataset]] = {
    "scattered-digits": ScatteredDigitsDataset,
    "digits": DigitsDataset,
}
DEFAULT_EMBEDDED = "scattered-digits"


def embedded_name(data: str | os.PathLike | None) -> str | None:
    """The embedded set a `--data` value names (None means the default one), or None for a folder."""
    if data is None:
        return DEFAULT_EMBEDDED
    text = str(data)
    if not text.startswith(EMBEDDED_PREFIX):
        return None
    name = text[len(EMBEDDED_PREFIX):]
    if name not in EMBEDDED_SETS:
        raise DataError(f"--data {text}: unknown embedded set; expected one of "
                        + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_SETS))
    return name


def embedded_dataset(name: str, split: str, transform: Callable | None, image_size: int) -> InMemoryDataset:
    return EMBEDDED_SETS[name](split, transform, image_size=image_size)


@dataclass
class SplitPair:
    """Train and val datasets with one class list; `root` is what goes into cache keys and reports."""

    train: Any
    val: Any
    classes: list[str]
    root: str


def make_datasets(data: str | os.PathLike | None, train_transform: Any, val_transform: Any, image_size: int,
                  data_root: str | os.PathLike | None = None, all_ranks: bool = False) -> SplitPair:
    """The evaluators' labelled train and val sets from any `--data` form (docs/datasets.md).

    `--data DIR` with train/ and val/ class folders, `train.txt` beside `val.txt` (or `test.txt`), a named set
    (`cifar10`, ...: train and test, read from `data_root`), or an embedded set (`embedded:NAME`; None: the
    default). `all_ranks`: every rank of the process group makes this call, so rank 0 alone scans the files.
    """
    name = embedded_name(data)
    if name is not None:
        train = embedded_dataset(name, "train", train_transform, image_size)
        return SplitPair(train, embedded_dataset(name, "val", val_transform, image_size), train.classes,
                         f"<embedded {name} {image_size}px>")
    from .file_lists import eval_samples, scan_once
    from .named_sets import named_set, named_split_pair

    named = named_set(data)
    if named is not None:
        return named_split_pair(named, train_transform, val_transform, data_root, all_ranks)
    root = Path(data)
    train_scan, val_scan = scan_once(lambda: eval_samples(root), all_ranks)
    train = ImageFolderDataset(train_scan.root, train_transform, train_scan.classes, train_scan.samples)
    val = ImageFolderDataset(val_scan.root, val_transform, val_scan.classes, val_scan.samples)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        what = "the train and val lists must have the same labels" if train_scan.root.is_file() else \
            "train/ and val/ must have the same class folders"
        raise DataError(f"--data {root}: {what} (only in train: {only_train[:10]}, only in val: {only_val[:10]})")
    return SplitPair(train, val, train.classes, str(root.resolve()))


def collate_with_skips(batch: Sequence[tuple[Any, int, tuple[str, ...]]]) -> tuple[Any, torch.Tensor, list[str]]:
    """Default collation of samples and targets; the bad paths of the batch are passed through as a list."""
    samples = torch.utils.data.default_collate([b[0] for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
    bad = [p for b in batch for p in b[2]]
    return samples, targets, bad
