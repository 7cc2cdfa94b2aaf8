"""The training views of `moco eval linear` (faithful), checked by what they do to an image: the protocol's
RandomResizedCrop covers 8% to 100% of the image and half of the views are mirrored.

The image's red channel holds each pixel's column and green its row, so a view's pixels tell which part of
the image it shows and whether it is mirrored. The transform is the one the command builds (captured where it
makes its datasets), drawn as its training loader draws it: seeded by (epoch seed, index)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_transfer.cli import main
from moco_transfer.eval import linear
from moco_transfer.seeded_order import draw_item, epoch_seed

from .eval_helpers import make_checkpoint, make_image_folder

SIDE = 256  # one 8-bit value per column and per row


class Captured(Exception):
    pass


def command_train_transform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_size: int) -> Any:
    """The training transform `moco eval linear` passes to its datasets for a checkpoint of `image_size`."""
    ckpt = make_checkpoint(tmp_path / f"ck{image_size}.pth.tar", image_size=16)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["image_size"] = image_size
    torch.save(state, ckpt)
    data = make_image_folder(tmp_path / "data", per_class=1)
    seen: list[Any] = []

    def capture(root: Any, train_tf: Any, *rest: Any, **kw: Any) -> Any:
        seen.append(train_tf)
        raise Captured

    monkeypatch.setattr(linear, "make_datasets", capture)
    result = CliRunner().invoke(main, ["eval", "linear", str(ckpt), "--data", str(data), "-o", str(tmp_path / "o"),
                                       "--no-cache", "-j", "0", "--epochs", "1"])
    assert isinstance(result.exception, Captured), result.output
    return seen[0]


class CoordinateImage(torch.utils.data.Dataset):
    """Every item is the same coordinate image under `transform`."""

    def __init__(self, transform: Any, n: int) -> None:
        ramp = np.arange(SIDE, dtype=np.uint8)
        pixels = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
        pixels[..., 0], pixels[..., 1] = ramp[None, :], ramp[:, None]
        self.image, self.transform, self.n = Image.fromarray(pixels), transform, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image)


def crop_geometry(view: torch.Tensor) -> tuple[float, float, bool]:
    """(width, height) of the image region a view shows, in source pixels, and whether it is mirrored.

    Inside the view the coordinates are linear in the output pixel: slope = region side / view side. The middle
    half of the pixels is used, away from the resampling filter's clipped borders.
    """
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    values = ((view * std + mean) * 255).double()
    size = view.shape[-1]
    middle = torch.arange(size // 4, size - size // 4, dtype=torch.float64)
    xs = values[0].mean(dim=0)[size // 4: size - size // 4]  # column coordinate along the view's width
    ys = values[1].mean(dim=1)[size // 4: size - size // 4]
    slope_x = float(np.polyfit(middle.numpy(), xs.numpy(), 1)[0])
    slope_y = float(np.polyfit(middle.numpy(), ys.numpy(), 1)[0])
    assert slope_y > 0, "views are never flipped upside down"
    return abs(slope_x) * size, slope_y * view.shape[-2], slope_x < 0


@pytest.mark.parametrize(("image_size", "draws"), [(16, 1000), (224, 400)])  # the small-image presets, ImageNet
def test_linear_training_views_crop_8_to_100_percent_and_mirror_half(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, image_size: int, draws: int, one_thread: None) -> None:
    transform = command_train_transform(tmp_path, monkeypatch, image_size)
    views = CoordinateImage(transform, draws)
    geometry = [crop_geometry(draw_item(views, epoch_seed(0, 1), i)) for i in range(draws)]
    for view in (draw_item(views, epoch_seed(0, 1), 0), draw_item(views, epoch_seed(0, 1), 1)):
        assert tuple(view.shape) == (3, image_size, image_size)
    areas = np.array([w * h for w, h, _ in geometry]) / SIDE**2
    ratios = np.array([w / h for w, h, _ in geometry])
    mirrored = np.mean([m for _, _, m in geometry])
    # RandomResizedCrop draws the area fraction uniformly in [0.08, 1] (sides rounded to pixels, measured to a
    # fraction of one): the smallest views come close to 8% and none is much smaller
    assert 0.07 < areas.min() < 0.095, areas.min()
    assert areas.max() > 0.9
    assert 0.08 < np.mean(areas < 0.2), "about an eighth of the views show under 20% of the image"
    assert 0.7 < ratios.min() < 0.8 and 1.25 < ratios.max() < 1.4  # aspect ratio in [3/4, 4/3]
    assert 0.4 < mirrored < 0.6, f"{mirrored:.0%} of the views mirrored; the protocol flips half"
