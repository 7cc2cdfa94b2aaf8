"""ResNet encoders for MoCo: torchvision ResNets, an optional small-image stem, split batch norm."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2")


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` equal sub-batches.

    On one device this imitates per-GPU BN of a multi-GPU run, which together with the key shuffle keeps
    the key encoder from cheating through batch statistics. Keys are those of nn.BatchNorm2d, so
    checkpoints stay interchangeable with plain BN. Sub-batch j holds samples j, j + s, j + 2s, ...
    """

    def __init__(self, num_features: int, num_splits: int = 1, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        if n % self.num_splits:
            raise ValueError(f"SplitBatchNorm: batch {n} is not divisible by num_splits={self.num_splits}")
        s = self.num_splits
        running_mean = self.running_mean.repeat(s)
        running_var = self.running_var.repeat(s)
        out = F.batch_norm(
            x.reshape(-1, c * s, h, w), running_mean, running_var,
            self.weight.repeat(s) if self.affine else None, self.bias.repeat(s) if self.affine else None,
            True, self.momentum if self.momentum is not None else 0.1, self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(s, c).mean(dim=0))
            self.running_var.copy_(running_var.view(s, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class HeadBatchNorm(SplitBatchNorm):
    """BN without affine on the projection head's output (MoCo v3's projector ends the same way).

    It centres and scales every output dimension over the (sub-)batch, so the outputs share no common
    component. Without it, at small scale that component drifts from step to step: keys made by the current
    key encoder then stand out from the older keys in the queue by freshness alone, and the loss rewards the
    drift instead of content (docs/small_scale.md). Sub-batches follow the backbone's split BN.
    """

    def __init__(self, num_features: int, num_splits: int = 1) -> None:
        super().__init__(num_features, num_splits, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x[:, :, None, None]).flatten(1)


def build_resnet(
    arch: str = "resnet50",
    num_classes: int = 1000,
    small_images: bool = False,
    bn_splits: int = 1,
) -> nn.Module:
    """A torchvision ResNet with random weights; `small_images` swaps the stem for 3x3/stride 1, no maxpool."""
    if arch not in RESNET_ARCHS:
        raise ValueError(f"--arch {arch!r}: expected one of {', '.join(RESNET_ARCHS)}")
    norm_layer: Callable[..., nn.Module] | None = (
        partial(SplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else None
    )
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    if small_images:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def feature_dim(arch: str) -> int:
    """Width of the avgpool output (the input of `fc`)."""
    return 512 if arch in ("resnet18", "resnet34") else 2048


def add_mlp_head(encoder: nn.Module) -> nn.Module:
    """MoCo v2 head: fc becomes Linear(d, d) -> ReLU -> old fc, keys `fc.0.*` and `fc.2.*` as officially."""
    dim_mlp = encoder.fc.weight.shape[1]
    encoder.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(inplace=True), encoder.fc)
    return encoder


def add_head_norm(encoder: nn.Module, norm: nn.Module) -> nn.Module:
    """Append `norm` to the head (MLP or v1's fc); the head's own keys keep their official names.

    A plain fc becomes `fc.0`, so an output norm changes v1 key names; the converters drop the head anyway.
    """
    layers = list(encoder.fc) if isinstance(encoder.fc, nn.Sequential) else [encoder.fc]
    encoder.fc = nn.Sequential(*layers, norm)
    return encoder


def strip_head(encoder: nn.Module) -> nn.Module:
    """The backbone alone: avgpool features out of `fc`."""
    encoder.fc = nn.Identity()
    return encoder


class ResNetTrunk(nn.Module):
    """A view of a ResNet up to global average pooling: the features evaluators use, sharing weights."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return torch.flatten(r.avgpool(x), 1)
