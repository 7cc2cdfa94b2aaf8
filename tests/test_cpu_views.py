"""The CPU pipeline's fast views against torchvision's recipe: the same draws, each swapped op against the op it
replaces at the same parameters, and whole views of real photographs (scikit-learn's two sample images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD, moco_v1_augmentation, moco_v2_augmentation
from moco_transfer.pretrain.cpu_views import (
    FastColorJitter,
    Uint8Tensor,
    adjust_hue,
    fast_views,
    normalize_views,
)

GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one grey level in normalised units, at the widest channel


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(p).resize((500, 375), Image.BICUBIC) for p in load_sample_images().images]


def _bytes(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_uint8_views_normalised_on_the_device_are_to_tensor_then_normalize(photos):
    images = [photos[i].crop((0, 0, 224, 224)) for i in (0, 1)]
    expected = torch.stack([TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD) for image in images])
    batch = torch.stack([Uint8Tensor()(image) for image in images])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 224, 224)
    assert torch.equal(normalize_views(batch), expected)  # bit for bit: a run's trajectory follows the last bits
    assert Uint8Tensor()(images[0].convert("L")).shape == (1, 224, 224)  # as ToTensor's (Normalize then refuses it)


@pytest.mark.parametrize("factor", [-0.1, -0.0625, -0.004, 0.0, 0.02, 0.1])
def test_hue_tables_give_pil_bytes(photos, factor):
    """Exact, on a photograph and on noise (every hue sector and saturation), at drawn factors."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    for image in (photos[1].crop((40, 20, 264, 244)), noise):
        assert np.array_equal(_bytes(adjust_hue(image, factor)), _bytes(TF.adjust_hue(image, factor)))
    grey = photos[0].convert("L")
    assert adjust_hue(grey, factor).tobytes() == grey.tobytes()  # torchvision returns grey images unchanged


def test_fast_jitter_draws_like_colorjitter(photos):
    """Same order and factors, same bytes."""
    image = photos[0].crop((50, 50, 274, 274))
    reference = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    fast = fast_views(T.Compose([reference, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])).transforms[0]
    assert isinstance(fast, FastColorJitter)
    for seed in range(10):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert np.array_equal(_bytes(fast(image)), _bytes(expected))


@pytest.mark.parametrize("recipe", ["v2", "v1", "v2-28px"])
def test_views_are_the_torchvision_recipe_at_the_same_seed(photos, recipe):
    reference = {"v2": lambda: moco_v2_augmentation(224),
                 "v1": lambda: moco_v1_augmentation(224),
                 "v2-28px": lambda: moco_v2_augmentation(28, 0.2, flip=False, blur=False)}[recipe]()
    fast = fast_views(reference)
    assert isinstance(fast.transforms[-1], Uint8Tensor)
    for seed in range(16):
        torch.manual_seed(seed)
        expected = reference(photos[seed % 2])
        after = torch.rand(1)
        torch.manual_seed(seed)
        got = fast(photos[seed % 2])
        assert torch.rand(1) == after  # the same draws: the generator ends where the recipe's did
        assert got.dtype == torch.uint8
        assert torch.equal(normalize_views(got[None])[0], expected)


def test_fast_views_refuses_a_recipe_it_cannot_finish():
    with pytest.raises(ValueError, match="ToTensor and ImageNet's Normalize"):
        fast_views(T.Compose([T.RandomResizedCrop(32), T.ToTensor()]))
