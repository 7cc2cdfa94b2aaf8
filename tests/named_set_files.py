"""Tiny copies of the named sets in their real on-disk formats, written here so that no test downloads anything.

Each writer takes the images as a test would look at them, (N, H, W, 3) or (N, H, W) uint8, and returns them
with their labels, so the tests compare what the loaders give with what was written: an independent reference.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def images(n: int, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """Random uint8 images with some structure: distinct channel levels, a horizontal ramp, vertical stripes."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 120, size, dtype=np.float32)[None, None, :, None]
    stripes = (np.arange(size) % 4 < 2).astype(np.float32)[None, None, :, None] * 40
    levels = np.array([90, 50, 10][:channels], np.float32)[None, None, None, :]
    noise = rng.normal(0, 30, (n, size, size, channels))
    out = np.clip(levels + ramp + stripes + noise, 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def labels(n: int, classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 1000).integers(0, classes, n)


def _pickle(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)  # the real files are Python 2 pickles (protocol 2)


def _cifar_rows(hwc: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: the R plane, then G, then B, each 32x32 row-major: (N, 3072)."""
    return hwc.transpose(0, 3, 1, 2).reshape(len(hwc), -1)


def write_cifar10(root: Path, per_batch: int = 4, test: int = 5, seed: int = 0) -> dict[str, tuple]:
    folder = root / "cifar-10-batches-py"
    train_x, train_y = images(5 * per_batch, 32, seed), labels(5 * per_batch, 10, seed)
    test_x, test_y = images(test, 32, seed + 1), labels(test, 10, seed + 1)
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        _pickle(folder / f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5",
                                                 "labels": train_y[part].tolist(), "data": _cifar_rows(train_x[part]),
                                                 "filenames": [f"img_{j}.png" for j in range(per_batch)]})
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_y.tolist(),
                                    "data": _cifar_rows(test_x), "filenames": [f"t_{j}.png" for j in range(test)]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _pickle(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return {"train": (train_x, train_y), "test": (test_x, test_y), "classes": names}


def write_cifar100(root: Path, train: int = 6, test: int = 4, seed: int = 10) -> dict[str, tuple]:
    folder = root / "cifar-100-python"
    train_x, train_y = images(train, 32, seed), labels(train, 100, seed)
    test_x, test_y = images(test, 32, seed + 1), labels(test, 100, seed + 1)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        _pickle(folder / name, {"filenames": [f"{j}.png" for j in range(len(x))], "batch_label": name,
                                "fine_labels": y.tolist(), "coarse_labels": (y // 5).tolist(),
                                "data": _cifar_rows(x)})
    names = [f"class_{i:02d}" for i in range(100)]
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": [str(i) for i in range(20)]})
    return {"train": (train_x, train_y), "test": (test_x, test_y), "classes": names}


def _stl_bytes(hwc: np.ndarray) -> bytes:
    """STL-10's binaries are column-major per channel: for each image, C planes of W columns of H pixels."""
    return hwc.transpose(0, 3, 2, 1).tobytes()


def write_stl10(root: Path, train: int = 3, test: int = 2, unlabeled: int = 4, seed: int = 20) -> dict[str, tuple]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = images(train, 96, seed), labels(train, 10, seed)
    test_x, test_y = images(test, 96, seed + 1), labels(test, 10, seed + 1)
    unlabeled_x = images(unlabeled, 96, seed + 2)
    (folder / "train_X.bin").write_bytes(_stl_bytes(train_x))
    (folder / "train_y.bin").write_bytes((train_y + 1).astype(np.uint8).tobytes())  # 1-based on disk
    (folder / "test_X.bin").write_bytes(_stl_bytes(test_x))
    (folder / "test_y.bin").write_bytes((test_y + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(_stl_bytes(unlabeled_x))
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    return {"train": (train_x, train_y), "test": (test_x, test_y), "unlabeled": (unlabeled_x, None),
            "classes": names}


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX: two zero bytes, type 0x08 (uint8), the rank, then each size as a big-endian uint32, then the data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist_like(folder: Path, gz: bool, train: int = 7, test: int = 3, seed: int = 30) -> dict[str, tuple]:
    """MNIST's four IDX files in `folder` (torchvision: ROOT/MNIST/raw or ROOT/FashionMNIST/raw), plain or .gz."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = images(train, 28, seed, channels=1), labels(train, 10, seed).astype(np.uint8)
    test_x, test_y = images(test, 28, seed + 1, channels=1), labels(test, 10, seed + 1).astype(np.uint8)
    for name, array in (("train-images-idx3-ubyte", train_x), ("train-labels-idx1-ubyte", train_y),
                        ("t10k-images-idx3-ubyte", test_x), ("t10k-labels-idx1-ubyte", test_y)):
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return {"train": (train_x, train_y), "test": (test_x, test_y)}


def write_svhn(folder: Path, train: int = 5, test: int = 4, seed: int = 40) -> dict[str, tuple]:
    """SVHN's cropped-digit .mat files: X (32, 32, 3, N) uint8, y (N, 1) with the digit 0 stored as 10."""
    import scipy.io

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n, s in (("train", train, seed), ("test", test, seed + 1)):
        x, y = images(n, 32, s), labels(n, 10, s)
        y[0] = 0  # at least one zero digit, stored as 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x.transpose(1, 2, 3, 0),
                                                         "y": np.where(y == 0, 10, y).astype(np.uint8)[:, None]})
        out[split] = (x, y)
    return out
