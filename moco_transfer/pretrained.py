"""A frozen backbone from a MoCo checkpoint (this project's or the official release's), loaded strictly.

The official linear script loads with strict=False and asserts only on fc; users of other loaders get silently
random networks. Here every backbone tensor must come from the checkpoint or loading fails with the list of
what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import RESNET_ARCHS, build_resnet, feature_dim, strip_head
from .checkpoint import CheckpointError, load_checkpoint, query_encoder_state
from .data import embedded_name
from .fileio import describe_key_mismatch, sha256_file


@dataclass
class PretrainedBackbone:
    """What an evaluator needs to know about a checkpoint besides its weights."""

    model: nn.Module
    arch: str
    small_images: bool
    image_size: int
    feature_dim: int
    epoch: int | None
    path: Path
    fingerprint: str
    embedded_data: str | None = None  # the embedded set it was pretrained on: the evaluators' default --data


def _infer_arch(state: dict[str, torch.Tensor], small_images: bool, path: Path) -> str:
    """Arch from the key set and shapes, for checkpoints that do not name it."""
    for arch in RESNET_ARCHS:
        expected = strip_head(build_resnet(arch, small_images=small_images)).state_dict()
        if set(expected) == set(state) and all(expected[k].shape == state[k].shape for k in expected):
            return arch
    raise CheckpointError(f"checkpoint {path}: no 'arch' entry and the weights match none of {RESNET_ARCHS}")


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    problems = describe_key_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                     {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise CheckpointError(f"checkpoint {path}: query encoder under 'module.encoder_q.' does not match a {arch} "
                              f"backbone ({'; '.join(problems)}); refusing to evaluate a partly random network")


def pretrained_on_embedded(config: dict[str, Any]) -> str | None:
    """`embedded:NAME` when the run trained on an embedded set (checkpoints from before `embedded:` meant digits)."""
    data = config.get("data")
    if data is None:
        return "embedded:digits" if config.get("preset") == "digits" else None
    return str(data) if embedded_name(data) is not None else None


def load_pretrained_backbone(path: str | os.PathLike, device: torch.device | str = "cpu") -> PretrainedBackbone:
    """The query encoder minus its head, frozen (no grad) and in eval mode, with its input geometry.

    Arch, small-image stem and image size come from the checkpoint's `config` when it has one (this project);
    otherwise from `arch` and the weights (official checkpoints: 7x7 stem, 224 px).
    """
    path = Path(path)
    ckpt = load_checkpoint(path)
    config: dict[str, Any] = ckpt.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    state = query_encoder_state(ckpt["state_dict"], source=f"checkpoint {path}")
    conv1 = state.get("conv1.weight")
    small = bool(config["small_images"]) if "small_images" in config else (
        conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3)
    arch = config.get("arch") or ckpt.get("arch")
    if arch is None:
        arch = _infer_arch(state, small, path)
    if arch not in RESNET_ARCHS:
        raise CheckpointError(f"checkpoint {path}: arch {arch!r} is not one of {RESNET_ARCHS}")
    image_size = int(config.get("image_size") or (32 if small else 224))
    model = strip_head(build_resnet(arch, small_images=small))
    _check_keys(model, state, arch, path)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    model.eval().to(device)
    epoch = ckpt.get("epoch")
    return PretrainedBackbone(
        model=model, arch=arch, small_images=small, image_size=image_size, feature_dim=feature_dim(arch),
        epoch=int(epoch) if isinstance(epoch, int | float) else None, path=path, fingerprint=sha256_file(path),
        embedded_data=pretrained_on_embedded(config))
