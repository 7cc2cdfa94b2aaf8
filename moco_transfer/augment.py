"""MoCo augmentations (v1 and v2's aug+) and the evaluation transform, sized for any input resolution."""

from __future__ import annotations

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur (radius = sigma) with sigma ~ U[0.1, 2.0], as in the MoCo v2 recipe.

    PIL's filter costs a fraction of a tensor convolution on a CPU; sigma comes from torch's generator so a
    seeded epoch draws the same blur again on resume.
    """

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


def _flip(flip: bool) -> list:
    return [T.RandomHorizontalFlip()] if flip else []


def _blur(blur: bool, image_size: int) -> list:
    """aug+'s blur (p 0.5), its sigma scaled from 224 px crops; none when switched off (`--no-blur`)."""
    sigma_scale = image_size / 224
    return [T.RandomApply([GaussianBlur((0.1 * sigma_scale, 2.0 * sigma_scale))], p=0.5)] if blur else []


def moco_v2_augmentation(image_size: int = 224, crop_min: float = 0.2, flip: bool = True,
                         blur: bool = True) -> T.Compose:
    """aug+: v1's crop/grayscale/flip plus weaker-hue jitter at p=0.8 and Gaussian blur sigma in [0.1, 2].

    The blur's sigma is given for 224 px crops and scales with `image_size`, so small images are blurred by
    the same fraction of their width rather than wiped out (sigma 2 px is 12% of a 16 px digit).
    `flip=False` drops the mirror, for images whose mirror image means something else (digits, text).
    `blur=False` drops the blur, as the MoCo authors' CIFAR-10 demo does (aug+ without blur).
    """
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        *_blur(blur, image_size),
        *_flip(flip),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def moco_v1_augmentation(image_size: int = 224, crop_min: float = 0.2, flip: bool = True) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
        T.RandomGrayscale(p=0.2),
        T.ColorJitter(0.4, 0.4, 0.4, 0.4),
        *_flip(flip),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int = 224) -> T.Compose:
    """Resize to 256/224 of the crop, then center crop (Resize 256 + CenterCrop 224 at ImageNet size)."""
    return T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def linear_train_transform(image_size: int = 224) -> T.Compose:
    """The linear protocol's training transform: RandomResizedCrop (scale 0.08-1) and flip."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoCrops:
    """Two independent draws of the same augmentation: the query and the key view."""

    def __init__(self, transform: T.Compose) -> None:
        self.transform = transform

    def __call__(self, image):  # noqa: ANN001, ANN204 - a PIL image in, two tensors out
        return [self.transform(image), self.transform(image)]
