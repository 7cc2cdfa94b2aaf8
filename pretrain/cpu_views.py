"""The CPU pipeline's aug+ and v1 views: torchvision's recipe, its hue exact and fast, handed over as uint8.

Where one loader core spends its time on a 500x375 photograph (docs/pipeline.md has the table): PIL's hue
(two float RGB<->HSV conversions per pixel, 80% of the views) was the largest part. `fast_views` keeps every
random draw of the torchvision transforms, in the same order from the same generator, and replaces:

- hue: two table look-ups per pixel in tables that PIL's own RGB<->HSV conversion of all 16.7M colours fills
  once per process (100 MB, shared by forked workers), so every byte is PIL's;
- to tensor and normalise: the views leave the workers as uint8 (a quarter of the bytes to collate and pass
  between processes) and the training step normalises the batch on its device (`normalize_views`, with the
  same float32 bits as ToTensor + Normalize).

The other ops stay torchvision's (docs/pipeline.md says which levers were measured and left). A seeded draw
therefore gives the torchvision recipe's views (tests/test_cpu_views.py), so exact resume, per-image seeds and
the any-worker-count guarantee carry over unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD

_TABLES: tuple[np.ndarray, np.ndarray] | None = None
_TABLES_LOCK = threading.Lock()


def hue_tables() -> tuple[np.ndarray, np.ndarray]:
    """PIL's RGB -> (hue | saturation << 8) as uint16, and PIL's HSV -> RGBX as uint32, each indexed by the three
    bytes packed into 24 bits. Built on first use (about 1 s); build_pretrain_dataset builds them in the main
    process, so forked loader workers share the pages instead of building their own."""
    global _TABLES
    with _TABLES_LOCK:
        if _TABLES is None:
            every = np.arange(1 << 24, dtype=np.uint32)
            colours = np.stack([every >> 16, (every >> 8) & 255, every & 255], axis=-1).astype(np.uint8)
            colours = colours.reshape(4096, 4096, 3)
            hsv = np.asarray(Image.fromarray(colours, "RGB").convert("HSV"))
            to_hs = np.ascontiguousarray(hsv[..., :2]).view(np.uint16).reshape(-1)  # little-endian: hue low
            rgbx = np.asarray(Image.frombytes("HSV", (4096, 4096), colours.tobytes()).convert("RGBX"))
            _TABLES = to_hs, np.ascontiguousarray(rgbx).view(np.uint32).reshape(-1)
        return _TABLES


def _packed(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16) | (b.astype(np.uint32) << 8) | c


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """torchvision's PIL `adjust_hue`, byte for byte: PIL's HSV bytes, hue + int(factor * 255) mod 256."""
    if image.mode != "RGB":  # torchvision leaves single-channel images alone and converts other modes
        return T.functional.adjust_hue(image, hue_factor)
    to_hs, to_rgbx = hue_tables()
    rgb = np.asarray(image)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hs = to_hs[_packed(red, green, blue)]
    shift = int(np.int32(hue_factor * 255).astype(np.uint8))  # torchvision's shift, wrapped as its uint8 add
    value = np.maximum(np.maximum(red, green), blue)
    rgbx = to_rgbx[_packed((hs + shift) & 255, hs >> 8, value)]
    return Image.frombytes("RGB", image.size, rgbx.tobytes(), "raw", "RGBX")


class FastColorJitter(T.ColorJitter):
    """ColorJitter with the same draws (order and factors) and the table hue above, for PIL images."""

    def forward(self, img: Any) -> Any:
        if not isinstance(img, Image.Image) or img.mode not in ("RGB", "L"):
            return super().forward(img)
        order, brightness, contrast, saturation, hue = self.get_params(self.brightness, self.contrast,
                                                                       self.saturation, self.hue)
        ops = ((T.functional.adjust_brightness, brightness), (T.functional.adjust_contrast, contrast),
               (T.functional.adjust_saturation, saturation), (adjust_hue, hue))
        for index in order.tolist():
            op, factor = ops[index]
            if factor is not None:
                img = op(img, factor)
        return img


class Uint8Tensor:
    """The view as a CHW uint8 tensor: ToTensor + Normalize move to the training step (`normalize_views`)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.array(image)  # writable, so torch can wrap it
        return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return "Uint8Tensor()"


def normalize_views(views: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """A uint8 batch (N, C, H, W) as ToTensor + Normalize made it, bit for bit, in float32 on its device.

    The same elementwise ops in the same order (/ 255, - mean, / std), each rounded to float32 as theirs are: a
    fused (x - 255 mean) / (255 std) differs in the last bit, and a run's trajectory follows such bits. On CUDA
    the result is the same: PyTorch's kernels are built without fast-math, so float32 / and - round exactly.
    """
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=views.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=views.device).view(shape)
    return views.to(torch.float32).div_(255).sub_(mean_t).div_(std_t)


def _fast(transform: Any) -> Any:
    if type(transform) is T.ColorJitter:
        fast = FastColorJitter()
        fast.brightness, fast.contrast = transform.brightness, transform.contrast
        fast.saturation, fast.hue = transform.saturation, transform.hue
        return fast
    if type(transform) is T.RandomApply:
        return T.RandomApply([_fast(t) for t in transform.transforms], p=transform.p)
    return transform


def fast_views(augmentation: T.Compose) -> T.Compose:
    """The same recipe with the fast ops and uint8 output: the same random draws and, after `normalize_views`,
    the same views. The recipe must end in ToTensor + Normalize with ImageNet's mean and std."""
    *steps, to_tensor, normalize = augmentation.transforms
    if not (isinstance(to_tensor, T.ToTensor) and isinstance(normalize, T.Normalize)
            and tuple(normalize.mean) == IMAGENET_MEAN and tuple(normalize.std) == IMAGENET_STD):
        raise ValueError(f"fast_views: expected a recipe ending in ToTensor and ImageNet's Normalize, got "
                         f"{augmentation}")
    return T.Compose([*(_fast(t) for t in steps), Uint8Tensor()])
