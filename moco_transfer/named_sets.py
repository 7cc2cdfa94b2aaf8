"""The standard small sets by name (`--data cifar10`, ...), read from torchvision's on-disk layouts as uint8 arrays.

The files are neither unpacked into images nor decoded per item: a set is one (N, C, H, W) uint8 array, which the
CPU pipeline turns into a PIL image per item and the device pipeline copies to the device once. The readers are
written here (torchvision's classes want unpacked IDX files and read everything at construction); torchvision is
used only to download, with `--download`.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .data import DataError, SplitPair

DATA_ROOT_ENV = "MOCO_DATA_ROOT"
DEFAULT_DATA_ROOT = Path("~/.cache/moco_transfer/datasets")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist, gzipped IDX
SPLITS = ("train", "test", "pretrain")

# What `--data-root` and `--download` of the evaluators set for the process (the CLI's callbacks), so that the
# evaluators' own signatures need not carry them; an explicit argument still wins.
_defaults: dict[str, Any] = {"root": None, "download": False}


def set_data_defaults(root: str | os.PathLike | None = None, download: bool | None = None) -> None:
    """Process-wide `--data-root` / `--download` for callers that do not pass them (the CLI sets these)."""
    if root is not None:
        _defaults["root"] = str(root)
    if download is not None:
        _defaults["download"] = bool(download)


@contextmanager
def data_defaults(root: str | os.PathLike | None = None, download: bool | None = None) -> Iterator[None]:
    """The defaults set only inside the block (tests)."""
    saved = dict(_defaults)
    set_data_defaults(root, download)
    try:
        yield
    finally:
        _defaults.update(saved)


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where the named sets' files are: `root`, else --data-root, else $MOCO_DATA_ROOT, else the default."""
    chosen = root or _defaults["root"] or os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT
    return Path(chosen).expanduser()


@dataclass
class ArraySplit:
    """One split of a named set: uint8 images (N, C, H, W) with C 1 or 3, int64 targets (-1: unlabelled)."""

    name: str
    split: str
    images: np.ndarray
    targets: np.ndarray
    classes: list[str]
    folder: Path  # where the files were read


# ---------------------------------------------------------------------------------------------- file readers


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's batches are pickles: allow the few globals a dict of numpy arrays needs, so a file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")
        if module == "_codecs":
            import codecs

            return codecs.encode
        if module == "numpy":
            return getattr(np, name)
        core = getattr(np, "_core", None) or np.core
        return getattr(core.multiarray, name)


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch (Python 2 pickle of a dict); keys come back as str whichever Python wrote them."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR python batch (a {type(entry).__name__}, expected a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped: 2 zero bytes, a type code, the rank, big-endian sizes."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype, rank = _IDX_TYPES[data[2]], data[3]
    offset = 4 + 4 * rank
    if len(data) < offset:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{rank}I", data[4:offset])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(f"{path}: {len(data) - offset} bytes of data, {expected} expected for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def _file(folder: Path, name: str, gz: bool) -> Path | None:
    """`name`, or `name.gz` where gzipped files are accepted; None when neither exists."""
    for candidate in ((name, name + ".gz") if gz else (name,)):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _labels_match(images: np.ndarray, labels: np.ndarray, path: Path, classes: int) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(labels)} labels for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"{path}: labels outside 0..{classes - 1} (found {labels.min()}..{labels.max()})")
    return labels


def _read_cifar(spec: NamedSet, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = list(spec.classes)
    meta_name, meta_key = ("batches.meta", "label_names") if spec.name == "cifar10" else ("meta", "fine_label_names")
    if (folder / meta_name).is_file():
        classes = [str(c) for c in read_cifar_pickle(folder / meta_name).get(meta_key, classes)]
    chunks, labels = [], []
    for name in spec.files[split]:
        entry = read_cifar_pickle(folder / name)
        data = np.asarray(entry.get("data"))
        key = "labels" if spec.name == "cifar10" else "fine_labels"
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or key not in entry:
            raise DataError(f"{folder / name}: expected 'data' (N, 3072) uint8 and '{key}'")
        images = data.reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32: already (N, C, H, W)
        chunks.append(images)
        labels.append(_labels_match(images, np.asarray(entry[key]), folder / name, len(classes)))
    return np.concatenate(chunks), np.concatenate(labels), classes


def _read_stl_images(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if size % (3 * 96 * 96):
        raise DataError(f"{path}: {size} bytes, not a whole number of 3x96x96 images")
    # Column-major planes: (N, C, W, H) on disk; the transpose is a view, the copy to one array comes later.
    return np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)


def _read_stl(spec: NamedSet, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = list(spec.classes)
    if (folder / "class_names.txt").is_file():
        classes = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines() if line.strip()]
    prefix = "test" if split == "test" else "train"
    images = _read_stl_images(folder / f"{prefix}_X.bin")
    labels = _labels_match(images, np.fromfile(folder / f"{prefix}_y.bin", dtype=np.uint8).astype(np.int64) - 1,
                           folder / f"{prefix}_y.bin", len(classes))
    if split != "pretrain":
        return np.ascontiguousarray(images), labels, classes
    unlabeled = _read_stl_images(folder / "unlabeled_X.bin")
    out = np.empty((len(images) + len(unlabeled), 3, 96, 96), dtype=np.uint8)
    out[:len(images)] = images
    out[len(images):] = unlabeled
    return out, np.concatenate([labels, np.full(len(unlabeled), -1, dtype=np.int64)]), classes


def _read_idx_set(spec: NamedSet, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    image_name, label_name = spec.files[split]
    image_path, label_path = _file(folder, image_name, True), _file(folder, label_name, True)
    assert image_path is not None and label_path is not None  # find_folder checked them
    images = read_idx(image_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{image_path}: expected (N, H, W) uint8 images, got {images.dtype} {images.shape}")
    labels = read_idx(label_path)
    return images[:, None], _labels_match(images, labels, label_path, len(spec.classes)), list(spec.classes)


def _read_svhn(spec: NamedSet, folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import scipy.io

    path = folder / spec.files[split][0]
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, OSError, TypeError) as exc:
        raise DataError(f"{path}: not a MATLAB file ({type(exc).__name__}: {exc})") from None
    images, labels = mat.get("X"), mat.get("y")
    if images is None or labels is None or images.ndim != 4 or images.shape[2] != 3 or images.dtype != np.uint8:
        raise DataError(f"{path}: expected 'X' (32, 32, 3, N) uint8 and 'y'")
    images = images.transpose(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN writes the digit 0 as label 10
    return np.ascontiguousarray(images), _labels_match(images, labels, path, 10), list(spec.classes)


# ---------------------------------------------------------------------------------------------- downloads


def _torchvision_download(kind: str, **split_args: Any) -> Callable[[Path], None]:
    """A downloader through torchvision's class `kind`, once per given split keyword (e.g. train=True, False)."""

    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, kind)
        (key, values), = split_args.items()
        for value in values:
            cls(str(root), download=True, **{key: value})

    return download


def _download_svhn(root: Path) -> None:
    import torchvision.datasets as tvd

    for split in ("train", "test"):
        tvd.SVHN(str(root / "svhn"), split=split, download=True)


# ---------------------------------------------------------------------------------------------- the sets


Reader = Callable[["NamedSet", Path, str], tuple[np.ndarray, np.ndarray, list[str]]]


@dataclass(frozen=True)
class NamedSet:
    """A set's files per split, the folders under the root that may hold them, and how to read and download it."""

    name: str
    folders: tuple[str, ...]  # under the data root, in search order ("." is the root itself)
    files: dict[str, tuple[str, ...]]  # train, test, pretrain
    classes: tuple[str, ...]
    reader: Reader
    download: Callable[[Path], None]
    gz: bool = False  # files may also be gzipped (NAME.gz)
    elsewhere: tuple[Path, ...] = ()  # absolute folders tried after the root's (Debian's packages)


_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MNIST_FILES["pretrain"] = _MNIST_FILES["train"]
_DIGITS = tuple(str(i) for i in range(10))

NAMED_SETS: dict[str, NamedSet] = {s.name: s for s in (
    NamedSet("cifar10", ("cifar-10-batches-py",),
             {"train": _CIFAR10_TRAIN, "test": ("test_batch",), "pretrain": _CIFAR10_TRAIN},
             ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
             _read_cifar, _torchvision_download("CIFAR10", train=(True, False))),
    NamedSet("cifar100", ("cifar-100-python",), {"train": ("train",), "test": ("test",), "pretrain": ("train",)},
             tuple(str(i) for i in range(100)), _read_cifar, _torchvision_download("CIFAR100", train=(True, False))),
    NamedSet("stl10", ("stl10_binary",),
             {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
              "pretrain": ("train_X.bin", "train_y.bin", "unlabeled_X.bin")},
             ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"),
             _read_stl, _torchvision_download("STL10", split=("train",))),
    NamedSet("fashion-mnist", ("FashionMNIST/raw",), _MNIST_FILES,
             ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
              "Ankle boot"),
             _read_idx_set, _torchvision_download("FashionMNIST", train=(True, False)), gz=True,
             elsewhere=(DEBIAN_FASHION_MNIST,)),
    NamedSet("mnist", ("MNIST/raw",), _MNIST_FILES, _DIGITS, _read_idx_set,
             _torchvision_download("MNIST", train=(True, False)), gz=True),
    NamedSet("svhn", ("svhn", "."), {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",),
                                     "pretrain": ("train_32x32.mat",)},
             _DIGITS, _read_svhn, _download_svhn),
)}


def named_set(data: str | os.PathLike | None) -> str | None:
    """The named set a `--data` value names, or None (a folder, a list, or an embedded set).

    A name wins over a folder of the same name in the working directory: write `./cifar10` for the folder.
    """
    return str(data) if data is not None and str(data) in NAMED_SETS else None


def find_folder(spec: NamedSet, split: str, root: Path) -> Path | None:
    """The first folder, under `root` and then elsewhere, that holds all of `split`'s files."""
    for folder in [root / sub for sub in spec.folders] + list(spec.elsewhere):
        if all(_file(folder, name, spec.gz) is not None for name in spec.files[split]):
            return folder
    return None


def missing_message(spec: NamedSet, split: str, root: Path) -> str:
    """One line: the files, where they go, and --download."""
    folder = root / spec.folders[0]
    files = ", ".join(n for n in spec.files[split] if _file(folder, n, spec.gz) is None)
    also = "".join(f" (also looked in {p})" for p in spec.elsewhere)
    gz = " (plain or .gz)" if spec.gz else ""
    return (f"--data {spec.name}: missing {files}{gz} in {folder}{also}; put them there (the root is --data-root, "
            f"else ${DATA_ROOT_ENV}, else {DEFAULT_DATA_ROOT}), or add --download")


def _download_once(spec: NamedSet, root: Path, all_ranks: bool) -> None:
    """Rank 0 downloads while the others wait (when every rank calls this): the downloads are not concurrency-safe."""
    from . import distributed as du

    if not all_ranks or du.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        try:
            spec.download(root)
        except Exception as exc:  # noqa: BLE001 - URLError, RuntimeError (checksum), OSError: all one message
            if all_ranks:
                du.barrier()
            raise DataError(f"--data {spec.name} --download: torchvision could not download it into {root} "
                            f"({type(exc).__name__}: {exc})") from None
    if all_ranks:
        du.barrier()


def load_named_split(name: str, split: str, root: str | os.PathLike | None = None, download: bool | None = None,
                     all_ranks: bool = False) -> ArraySplit:
    """A named set's split ("train", "test", or "pretrain": train, plus STL-10's unlabeled images) as arrays.

    `all_ranks`: every rank of the process group makes this call, so a download can be rank 0's alone.
    """
    spec = NAMED_SETS[name]
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {SPLITS}")
    base = data_root(root)
    folder = find_folder(spec, split, base)
    if folder is None and (_defaults["download"] if download is None else download):
        _download_once(spec, base, all_ranks)
        folder = find_folder(spec, split, base)
    if folder is None:
        raise DataError(missing_message(spec, split, base))
    images, targets, classes = spec.reader(spec, folder, split)
    return ArraySplit(name, split, images, targets, classes, folder)


class ArrayImages(torch.utils.data.Dataset):
    """A named set's split with the `(sample, target, bad_paths)` items of ImageFolderDataset.

    Each item is made from the array as an RGB PIL image (grayscale sets too), so the CPU transforms are the
    ones the folder sets get; `array` is what the device pipeline copies to the device.
    """

    def __init__(self, split: ArraySplit, transform: Callable | None = None) -> None:
        self.array = split.images
        self.targets = split.targets.tolist()
        self.classes = split.classes
        self.root = Path(f"<{split.name}:{split.split} {split.folder}>")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.array)

    def load(self, index: int) -> Image.Image:
        chw = self.array[index]
        if chw.shape[0] == 1:
            return Image.fromarray(np.ascontiguousarray(chw[0])).convert("RGB")
        return Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0)))

    def __getitem__(self, index: int) -> tuple[Any, int, tuple[str, ...]]:
        image = self.load(index)
        return (self.transform(image) if self.transform else image), self.targets[index], ()


def named_split_pair(name: str, train_transform: Any, val_transform: Any, root: str | os.PathLike | None = None,
                     all_ranks: bool = False) -> SplitPair:
    """The evaluators' pair: train as gallery / training set, test as queries / evaluation set."""
    train = ArrayImages(load_named_split(name, "train", root, all_ranks=all_ranks), train_transform)
    test_split = load_named_split(name, "test", root, all_ranks=all_ranks)
    return SplitPair(train, ArrayImages(test_split, val_transform), train.classes, f"{name}:{test_split.folder}")
