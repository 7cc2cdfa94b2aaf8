"""A frozen backbone from a MoCo checkpoint (this project's or the official release's), loaded strictly.

The official linear script loads with strict=False and asserts only on fc; users of other loaders get silently
random networks. Here every backbone tensor must come from the checkpoint or loading fails with the list of
what is missing. Besides MoCo checkpoints (pickles, read with weights_only=True), `moco convert`'s safetensors
backbones (`*.safetensors`, torchvision or timm target) load too, checked as the converter checks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import RESNET_ARCHS, build_resnet, feature_dim, strip_head
from .checkpoint import CheckpointError, is_safetensors, load_checkpoint, query_encoder_state, read_safetensors
from .convert import check_backbone, infer_arch, shape_problems, small_stem
from .data import embedded_name
from .fileio import sha256_file
from .named_sets import named_set


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
    embedded_data: str | None = None  # the embedded or named set it was pretrained on: the evaluators' default --data
    preset_linear: PresetLinear | None = None  # its preset's linear-probe settings, when measured for it


def _check_keys(model: nn.Module, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    problems = shape_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"checkpoint {path}: query encoder under 'module.encoder_q.' does not match a {arch} "
                              f"backbone ({'; '.join(problems)}); refusing to evaluate a partly random network")


@dataclass(frozen=True)
class PresetLinear:
    """The linear-probe settings measured for one pretraining preset on its own data.

    The MoCo protocol's lr 30 per 256 images fits ResNet-50 features of ImageNet; other networks give features
    of another scale, on which lr 30 can blow the classifier's loss up. A checkpoint that names a preset listed
    in PRESET_LINEAR, and was pretrained on that preset's data, gets these settings by default; explicit
    options still win. They live here, beside the other evaluator defaults drawn from a checkpoint's config
    (`embedded_data`), so that eval/ reads them without importing the pretraining package; checkpoints written
    before they were measured get them too.
    """

    preset: str
    data: str  # what the preset pretrains on; a run of the preset on other data keeps the ImageNet protocol
    lr: float  # per 256 images, scaled linearly with --batch-size like the protocol's 30
    epochs: int = 100  # lr x0.1 at 60% and 80% of them, as the protocol

    def describe(self) -> str:
        return f"the {self.preset} preset's linear settings"


# The embedded default's lr, measured with `OMP_NUM_THREADS=1 moco eval linear CKPT --cached --lr LR` (batch 256,
# 100 epochs, x0.1 at 60 and 80) on the seed 0-2 checkpoints of `python benchmarks/demo_seeds.py` (30 epochs),
# 2-core x86_64 CPU, 2026-11-30. Final top-1 (%) on the 360 held-out digits; * = the loss-blow-up warning:
#   lr       30     10     3      1      0.3    0.1    0.05   0.03   0.02   0.01   0.003  0.001
#   seed 0   54.7*  55.6*  57.8*  55.6*  55.6*  58.3*  59.2   57.8   56.9   54.2   48.6   43.6
#   seed 1   59.2*                              59.4*  57.8   58.6   57.2   56.4
#   seed 2   63.6*                              61.7*  63.1   61.9   60.6   58.1
#   mean     59.2                               59.8   60.0   59.4   58.2   56.2
# The peak loss falls in proportion to the lr (2.7e4 at 30, 65 at 0.1): these features are large. lr 0.03 is the
# largest tried whose loss only falls (its peak is the first epoch's, ln 10); at 0.05 it climbs to 4-9, at 0.1 past
# the warning's 10 x ln 10. Its mean is lr 30's within noise (one digit is 0.28 points). The faithful mode, checked
# once on seed 0: lr 0.03 45.8 without a warning, lr 30 40.8 with it. docs/eval.md has more.
# Fashion-MNIST's, measured the same way (`OMP_NUM_THREADS=2 moco eval linear CKPT --cached --lr LR --cache-dir
# RUN/features -j 0`) on the two 10-epoch checkpoints of `python benchmarks/real_data.py` (docs/real_data.md:
# t1 the preset, t2 with crops from 20% and the mirror), 2-core x86_64 CPU, 2026-12-03. Final top-1 (%) on the
# 10,000 test images, and the first epoch's mean loss, the peak of every run (chance is ln 10 = 2.30):
#   lr       30     10     3      1      0.3    0.1    0.03   0.01
#   t1       87.24* 87.27* 87.17* 87.14  87.52  87.89  87.25  86.10
#   t2       88.81* 88.87* 88.94* 88.98  89.52  89.59  88.90  87.61
#   t1 peak  760    239    82     20     4.6    0.68   0.71   0.89
# lr 0.1 is the largest tried whose loss stays under chance from the first epoch, and the best of both columns.
PRESET_LINEAR: dict[str, PresetLinear] = {
    "scattered-digits": PresetLinear("scattered-digits", "embedded:scattered-digits", lr=0.03),
    "fashion-mnist": PresetLinear("fashion-mnist", "fashion-mnist", lr=0.1),
}


def preset_linear_settings(config: dict[str, Any]) -> PresetLinear | None:
    """The linear settings of the preset a checkpoint's config names, if measured and trained on its data."""
    settings = PRESET_LINEAR.get(str(config.get("preset")))
    if settings is None or config.get("data") != settings.data:
        return None
    return settings


def pretrained_on_embedded(config: dict[str, Any]) -> str | None:
    """`embedded:NAME` or a named set (`cifar10`, ...) when the run trained on one, as the evaluators' default
    `--data` (checkpoints from before `embedded:` meant digits). Its test split is what the evaluators score."""
    data = config.get("data")
    if data is None:
        return "embedded:digits" if config.get("preset") == "digits" else None
    return str(data) if embedded_name(data) is not None or named_set(data) is not None else None


def _metadata_int(metadata: dict[str, str], key: str, path: Path, minimum: int = 0) -> int | None:
    """An integer entry of a safetensors header's metadata (strings by the format), checked: the file is untrusted."""
    if key not in metadata:
        return None
    try:
        value = int(metadata[key])
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise CheckpointError(f"weights {path}: header metadata {key!r} is {metadata[key]!r}, not an integer >= "
                              f"{minimum} (corrupted or tampered)")
    return value


def _safetensors_checkpoint(path: Path) -> dict[str, Any]:
    """A converted safetensors backbone as load_pretrained_backbone's checkpoint dict (`state_dict`, `arch`,
    `epoch`, `config`), validated against torchvision's architecture as `moco convert` validates its input.

    The file holds the backbone's tensors under torchvision's names (no head, no prefix) and `moco convert`'s
    metadata; a file holding a MoCo state (`module.encoder_q.*`) is accepted too. The standard stem is implied:
    torchvision's and timm's ResNets have no other, and a 3x3 conv1 fails the shape check.
    """
    tensors, metadata = read_safetensors(path)
    if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in tensors):
        tensors = query_encoder_state(tensors, source=f"weights {path}")
    arch = metadata.get("arch") or infer_arch(tensors)
    if not arch:
        raise CheckpointError(f"weights {path}: no 'arch' in the header metadata and the tensors match no "
                              f"standard ResNet block layout")
    if arch not in RESNET_ARCHS:
        raise CheckpointError(f"weights {path}: arch {arch!r} is not one of {RESNET_ARCHS}")
    check_backbone(tensors, arch, f"weights {path}")
    config: dict[str, Any] = {"arch": arch, "small_images": False}
    image_size = _metadata_int(metadata, "image_size", path, minimum=1)
    if image_size is not None:
        config["image_size"] = image_size
    config.update({k: metadata[k] for k in ("data", "preset") if k in metadata})
    return {"state_dict": tensors, "arch": arch, "epoch": _metadata_int(metadata, "epoch", path), "config": config}


def load_pretrained_backbone(path: str | os.PathLike, device: torch.device | str = "cpu") -> PretrainedBackbone:
    """The query encoder minus its head, frozen (no grad) and in eval mode, with its input geometry.

    Arch, small-image stem and image size come from the checkpoint's `config` when it has one (this project);
    otherwise from `arch` and the weights (official checkpoints: 7x7 stem, 224 px). A `*.safetensors` file is a
    `moco convert` backbone: arch, epoch and image size come from its header metadata (224 px when absent).
    """
    path = Path(path)
    if is_safetensors(path):
        ckpt = _safetensors_checkpoint(path)
        state = ckpt["state_dict"]  # the backbone alone, validated already
    else:
        ckpt = load_checkpoint(path)
        state = query_encoder_state(ckpt["state_dict"], source=f"checkpoint {path}")
    config: dict[str, Any] = ckpt.get("config") or {}
    if not isinstance(config, dict):
        config = {}
    small = small_stem(state, config)
    arch = config.get("arch") or ckpt.get("arch") or infer_arch(state)
    if arch is None:
        raise CheckpointError(f"checkpoint {path}: no 'arch' entry and the weights match none of {RESNET_ARCHS}")
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
        embedded_data=pretrained_on_embedded(config), preset_linear=preset_linear_settings(config))
