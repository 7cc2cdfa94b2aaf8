"""The embedded preset's view switches reach both pipelines: no mirror, crops of at least 80%, aug+ colours.

docs/small_scale.md measures what each is worth (kNN 50.6% with the preset's views, 37.8% with the mirror,
16.9% with crops from 20%), so each is checked on views drawn by the loader the preset builds, CPU transforms
(`--data-pipeline cpu`, with the preset's loader worker) and device augmentation (`gpu`, run on CPU tensors).
Only the images are swapped: probe images whose views show the mirror, the crop area and the hue shift
whatever else aug+ does to them.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_transfer.data import InMemoryDataset
from moco_transfer.pretrain import data as pretrain_data
from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrain.engine import model_input

CPU = torch.device("cpu")
SIDE = 64          # probe images, cropped and resized to the preset's 16 px
BASE_COLOUR = (160, 100, 80)  # away from 0 and 255, so aug+'s factors never clamp a channel
PIPELINES = ["cpu", "gpu"]


class ProbeImages(InMemoryDataset):
    """n copies of one probe image in place of the embedded set's canonical drawings."""

    def __init__(self, image: Image.Image, n: int, transform: object) -> None:
        self.images, self.targets, self.classes = [image] * n, [0] * n, ["0"]
        self.root, self.transform = Path("<probe>"), transform


def gray_ramp() -> Image.Image:
    """Gray, dark on the left and bright on the right: a mirror puts the bright side left."""
    row = np.linspace(40, 200, SIDE).round().astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (SIDE, 1))[..., None], 3, axis=2))


def centred_square() -> Image.Image:
    """Two grays, the bright one a centred square of a quarter of the area."""
    pixels = np.full((SIDE, SIDE, 3), 90, np.uint8)
    pixels[SIDE // 4:3 * SIDE // 4, SIDE // 4:3 * SIDE // 4] = 150
    return Image.fromarray(pixels)


def plain_colour() -> Image.Image:
    return Image.fromarray(np.full((SIDE, SIDE, 3), BASE_COLOUR, np.uint8))


def preset_views(pipeline: str, image: Image.Image, monkeypatch: pytest.MonkeyPatch, n: int = 128) -> torch.Tensor:
    """Both views of n copies of `image` from the default preset's loader, unnormalised to 0-1 RGB.

    build_pretrain_dataset and build_pretrain_loader run as `moco pretrain` runs them; only the embedded
    pretraining images are replaced by the probe.
    """
    cfg = resolve_config(overrides={"data_pipeline": pipeline, "output": "unused"})
    assert cfg.preset == "scattered-digits" and cfg.data == "embedded:scattered-digits" and cfg.workers == 1
    asked = []

    def probe_dataset(name: str, split: str, transform: object, image_size: int) -> ProbeImages:
        asked.append((name, split, image_size))
        return ProbeImages(image, n, transform)

    with monkeypatch.context() as patch:
        patch.setattr(pretrain_data, "embedded_dataset", probe_dataset)
        dataset = pretrain_data.build_pretrain_dataset(cfg, CPU)
    assert asked == [("scattered-digits", "pretrain", 16)]
    loader = pretrain_data.build_pretrain_loader(cfg, dataset, CPU)
    pretrain_data.seed_epoch(loader, cfg.seed, 0)
    views = model_input(torch.cat([torch.cat(list(pair)) for pair, _, _ in loader]), CPU,
                        torch.contiguous_format)  # what the step sees: the CPU path's uint8 views normalised
    assert views.shape == (2 * n, 3, 16, 16)
    return views * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_views_are_never_mirrored(pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crops, colour ops (on gray: monotone in the value), grayscale and blur keep the ramp's direction; a mirror
    reverses it in half the views."""
    gray = preset_views(pipeline, gray_ramp(), monkeypatch).mean(dim=1)
    right_brighter = gray[:, :, 8:].mean(dim=(1, 2)) > gray[:, :, :8].mean(dim=(1, 2))
    assert right_brighter.all(), f"{int((~right_brighter).sum())} of {len(gray)} views mirrored"


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_crops_keep_at_least_80_percent_of_the_image(pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crop of area a >= 0.8 (side >= 0.77 at aspect 3/4) holds the whole centred square, which then fills
    0.25 / a <= 0.31 of the view. Crops from 0.2 zoom in: the square fills up to all of the view.

    Measured with the preset: 0.25-0.34 (the square's edge pixels are mixed at 16 px); with crops from 0.2,
    37-43% of the views above 0.45.
    """
    gray = preset_views(pipeline, centred_square(), monkeypatch).mean(dim=1)
    low, high = gray.amin(dim=(1, 2), keepdim=True), gray.amax(dim=(1, 2), keepdim=True)
    assert (high - low).min() > 0.05  # both grays in every view: the square is never cropped away or filled
    square_share = (gray > (low + high) / 2).float().mean(dim=(1, 2))
    assert square_share.min() >= 0.2 and square_share.max() <= 0.4, (square_share.min(), square_share.max())


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_colours_are_aug_plus(pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """aug+ shifts the hue by at most 0.1 (v1: 0.4) and leaves a fifth of the views unjittered (p 0.8; v1: 1).

    On one plain colour every op but the hue shift keeps the hue (they scale it, add gray, or blend with its
    gray), so the view's hue minus the probe's is the drawn shift. Grayscale views (p 0.2) carry no hue.
    """
    rgb = preset_views(pipeline, plain_colour(), monkeypatch).mean(dim=(2, 3))
    hsv = torch.tensor([colorsys.rgb_to_hsv(*c) for c in rgb.clamp(0, 1).tolist()])
    coloured = hsv[:, 1] > 0.05
    assert 0.7 < coloured.float().mean() < 0.9  # grayscale p 0.2
    base_hue = colorsys.rgb_to_hsv(*(c / 255 for c in BASE_COLOUR))[0]
    shift = (hsv[coloured, 0] - base_hue + 0.5) % 1.0 - 0.5
    assert 0.07 < shift.abs().max() <= 0.1 + 0.005, shift.abs().max()  # 8-bit rounding on the CPU path
    unjittered = (rgb[coloured] * 255 - torch.tensor(BASE_COLOUR)).abs().amax(dim=1) < 0.5
    assert 0.1 < unjittered.float().mean() < 0.32, unjittered.float().mean()
