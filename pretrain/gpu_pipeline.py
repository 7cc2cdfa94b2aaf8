"""The device data pipeline (`--data-pipeline gpu`): workers read bytes, the training device decodes and augments.

With the CPU pipeline each worker decodes and augments with PIL, about 81 images/s per core, so a GPU that
steps 2,500 images/s would need some 30 cores. Here the loader workers only read file bytes; the main process
decodes the JPEGs of a batch in one `torchvision.io.decode_jpeg` call on the device and draws both views with
`BatchedMocoAugment` (per-sample parameters, vectorised ops). The same code runs on CPU tensors, so the tests
exercise it without a GPU.

Files the device decoder should not get (PNG and other formats; grayscale, CMYK, progressive or truncated
JPEGs) are decoded in the worker with PIL, as the CPU pipeline does. A JPEG that still fails on the device is
decoded on the CPU; one that no decoder reads is replaced by the next readable file of the dataset, so batches
stay full, and its path is reported with the others that the epoch skipped.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor

from moco_transfer.data import DataError, ImageFolderDataset

from .config import PretrainConfig

if TYPE_CHECKING:
    from .gpu_augment import BatchedMocoAugment

# Sequential Huffman frames, which nvjpeg batch-decodes (in hardware on A100/H100). Progressive ones it decodes
# one by one with host work and a stream sync each, which the loader workers do better; the rest go to PIL too.
_SOF_MARKERS = frozenset({0xC0, 0xC1})
_SOURCE_LOCATION = re.compile(r"^[\w.]+, \S+:\d+, ")  # torchvision's "decode_jpeg, file.cpp:171, "
_MAX_REPLACEMENTS = 64  # as ImageFolderDataset: that many unreadable files in a row is a broken dataset


def resolve_pipeline(cfg: PretrainConfig, device: torch.device) -> str:
    """auto: the device pipeline on CUDA, the CPU pipeline otherwise (where the workers are the cores anyway)."""
    if cfg.data_pipeline == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return cfg.data_pipeline


def training_dtype(cfg: PretrainConfig) -> torch.dtype:
    """The views come out in the autocast dtype, which halves what the first convolution reads."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.float32)


def device_decodable(data: bytes | bytearray) -> bool:
    """True for a complete-looking 8-bit, 3-component sequential JPEG: what nvjpeg decodes fast, in one batch.

    Reads the marker segments up to the frame header. A file without the end-of-image marker (truncated) or
    with 1 (grayscale) or 4 (CMYK/YCCK) components, or progressive, returns False and is decoded on the CPU.
    """
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return False
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            return pos + 10 <= len(data) and data[pos + 4] == 8 and data[pos + 9] == 3
        if marker in (0xDA, 0xD9) or (0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return False  # scan data before any frame header, or another frame type (progressive, lossless...)
        pos += 2 + length
    return False


def decode_on_cpu(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """PIL decode to a uint8 3xHxW RGB tensor: the CPU pipeline's reader, so the same files are readable."""
    with Image.open(io.BytesIO(data)) as image:
        return pil_to_tensor(image.convert("RGB"))


class ImageBytesDataset(ImageFolderDataset):
    """Class-folder images as raw file bytes (1-D uint8) when the device can decode them, else decoded RGB.

    Items are `(data, target, bad_paths, file_index)`: unreadable files are replaced by the next readable one
    as in ImageFolderDataset, and `file_index` says which file was read, so the main process can continue
    from there when the device decoder rejects it.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__(root, transform=None)

    def load(self, index: int) -> torch.Tensor:  # type: ignore[override]
        with open(self.samples[index][0], "rb") as f:
            data = bytearray(f.read())
        if device_decodable(data):
            return torch.frombuffer(data, dtype=torch.uint8)
        return decode_on_cpu(data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...], int]:  # type: ignore[override]
        data, target, bad = super().__getitem__(index)
        return data, target, bad, (index + len(bad)) % len(self)  # each failed attempt adds one bad path


class TensorImages(torch.utils.data.Dataset):
    """An in-memory dataset of `(PIL image, target, bad)` items served as uint8 3xHxW RGB tensors."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.root = getattr(dataset, "root", Path("<in-memory>"))
        self.classes = getattr(dataset, "classes", None)
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...], int]:
        image, target, bad = self.dataset[index]
        if not isinstance(image, torch.Tensor):
            image = pil_to_tensor(image.convert("RGB"))
        return image, target, bad, index


def collate_raw(batch: Sequence[tuple[torch.Tensor, int, tuple[str, ...], int]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """One flat uint8 payload per batch (one shared-memory block from a worker, not one per image) and its layout.

    Row i of the layout is (nbytes, C, H, W, file index): C = 0 marks encoded file bytes, else the item is a
    decoded CxHxW image.
    """
    layout = torch.tensor([[data.numel(), *(data.shape if data.dim() == 3 else (0, 0, 0)), index]
                           for data, _, _, index in batch], dtype=torch.long)
    payload = torch.cat([b[0].reshape(-1) for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
    return payload, layout, targets, [p for b in batch for p in b[2]]


class DevicePipeline:
    """Iterates like the CPU loader: `([query views, key views], targets, skipped paths)` per batch.

    Wraps a DataLoader over ImageBytesDataset or TensorImages with collate_raw and drop_last. Decoding and
    augmentation run in this process on `device`; the augmentation generator lives there too and is seeded per
    epoch through `seed` (pretrain.data.seed_epoch), so an epoch draws the same views however the run got there.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, augment: BatchedMocoAugment,
                 device: torch.device) -> None:
        self.loader, self.augment, self.device = loader, augment, device
        self.dataset = loader.dataset
        self.generator = torch.Generator(device=device)
        self.decoded_on_cpu = 0  # JPEGs the device decoder refused but the CPU read

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        for payload, layout, targets, bad in self.loader:
            with torch.no_grad():
                images, more_bad = self.decode(payload, layout)
                views = self.augment.views(images, self.generator)
            yield views, targets, bad + more_bad

    def decode(self, payload: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor],
                                                                            list[str]]:
        """uint8 RGB images on the device: one batched decode_jpeg call for the encoded files.

        Returns a (B,3,H,W) tensor when every item came decoded at one size (the in-memory sets), else a
        list of 3xHxWi tensors, and the paths of files that no decoder read (replaced by readable ones).
        """
        rows = layout.tolist()
        if all(r[1] for r in rows) and len({tuple(r[1:4]) for r in rows}) == 1:
            c, h, w = rows[0][1:4]
            return payload.view(len(rows), c, h, w).to(self.device, non_blocking=True), []
        pieces = payload.split([r[0] for r in rows])
        images: list[torch.Tensor | None] = [
            p.view(r[1], r[2], r[3]).to(self.device, non_blocking=True) if r[1] else None
            for p, r in zip(pieces, rows, strict=True)]
        encoded = [i for i, r in enumerate(rows) if not r[1]]
        errors: dict[int, str] = {}
        if encoded:
            try:
                decoded = decode_jpeg([pieces[i] for i in encoded], mode=ImageReadMode.RGB, device=self.device)
            except (RuntimeError, ValueError):  # one bad file fails the whole call: one by one
                decoded = []
                for i in encoded:
                    image, error = self._decode_one(pieces[i])
                    decoded.append(image)
                    if error:
                        errors[i] = error
            for i, image in zip(encoded, decoded, strict=True):
                images[i] = image
        bad: list[str] = []
        for i, error in errors.items():
            bad.append(f"{self.dataset.samples[rows[i][4]][0]} ({error})")
            images[i] = self._next_readable(rows[i][4], bad)
        return images, bad  # type: ignore[return-value]

    def _decode_one(self, data: torch.Tensor) -> tuple[torch.Tensor | None, str]:
        """The device decoder, then PIL on the CPU; (None, reason) when neither reads the file."""
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device), ""
        except (RuntimeError, ValueError) as exc:
            device_error = _SOURCE_LOCATION.sub("", str(exc).strip().splitlines()[-1])
        try:
            image = decode_on_cpu(memoryview(data.numpy()))
        except (OSError, ValueError, SyntaxError) as exc:
            return None, f"decode_jpeg: {device_error}; PIL {type(exc).__name__}: {exc}"
        self.decoded_on_cpu += 1
        return image.to(self.device, non_blocking=True), ""

    def _next_readable(self, file_index: int, bad: list[str]) -> torch.Tensor:
        """The skip rule of ImageFolderDataset, run here: the next file after `file_index` that decodes."""
        dataset = self.dataset
        for step in range(1, _MAX_REPLACEMENTS + 1):
            index = (file_index + step) % len(dataset)
            path = dataset.samples[index][0]
            try:
                data = dataset.load(index)
            except (OSError, ValueError, SyntaxError) as exc:
                bad.append(f"{path} ({type(exc).__name__}: {exc})")
                continue
            if data.dim() == 3:
                return data.to(self.device, non_blocking=True)
            image, error = self._decode_one(data)
            if image is not None:
                return image
            bad.append(f"{path} ({error})")
        raise DataError(f"{dataset.root}: {_MAX_REPLACEMENTS} consecutive unreadable images after "
                        f"{dataset.samples[file_index][0]}: {bad[-3:]} ...")
