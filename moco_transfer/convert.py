"""Turn a MoCo checkpoint's query encoder into weights that detection and classification code loads.

Targets: detectron2 (a pickle of numpy arrays under detectron2's ResNet names, the format of the MoCo
authors' converter), torchvision (a plain state_dict for `torchvision.models.<arch>()`) and timm (the same
tensors: timm's ResNets use torchvision's names and shapes; without the projection head they load strictly into
`timm.create_model(arch, pretrained=False, num_classes=0)`). The backbone is checked against the torchvision
architecture (and timm's, when timm is installed) before anything is written, so a wrong or partial checkpoint
fails here with the missing names instead of loading silently into random weights later. torchvision and timm
outputs named `*.safetensors` are written with safetensors (arch, source, epoch, target in the header's metadata);
other names get torch.save's pickle, read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from .backbone import RESNET_ARCHS
from .checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_save_safetensors,
    is_safetensors,
    load_checkpoint,
    query_encoder_state,
)
from .fileio import atomic_open, describe_key_mismatch

TARGETS = ("detectron2", "torchvision", "timm")
# Config entries copied into a safetensors file's metadata: what `moco eval` needs to read the file like the
# checkpoint it came from (input size, default --data, the preset's linear-probe settings).
_CONFIG_METADATA = ("image_size", "data", "preset")
D2_AUTHOR = "MOCO"
_LAYER_RE = re.compile(r"^layer([1-4])\.(\d+)\.(.+)$")
_BN_RE = re.compile(r"^bn([1-3])\.(.+)$")
_DOWNSAMPLE_RE = re.compile(r"^downsample\.([01])\.(.+)$")
# (block kind, blocks per stage) -> depth, the ResNet paper's table (He et al. 2016, Table 1): with the width
# signature below it names a checkpoint that does not record its arch (the official release does record "arch").
_DEPTHS = {("basic", (2, 2, 2, 2)): 18, ("basic", (3, 4, 6, 3)): 34, ("bottleneck", (3, 4, 6, 3)): 50,
           ("bottleneck", (3, 4, 23, 3)): 101, ("bottleneck", (3, 8, 36, 3)): 152}


@dataclass
class Backbone:
    """The query encoder of a checkpoint, validated against a torchvision architecture."""

    source: str
    arch: str
    state: dict[str, torch.Tensor]
    skipped_head: list[str] = field(default_factory=list)
    epoch: int | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the pretraining config, when the checkpoint has one


@dataclass
class ConversionSummary:
    """What a conversion wrote; `format()` is the text the CLI prints."""

    source: str
    output: str
    target: str
    arch: str
    epoch: int | None
    tensors: int
    parameters: int
    skipped_head: list[str]
    missing_in_target: list[str] = field(default_factory=list)
    usage: str = ""  # how the target loads the file, printed for the user to copy

    def format(self) -> str:
        lines = [
            f"converted {self.source} -> {self.output} (target {self.target}, arch {self.arch}"
            + (f", epoch {self.epoch})" if self.epoch is not None else ")"),
            f"  tensors written: {self.tensors}  parameters: {self.parameters:,}",
            f"  skipped head keys ({len(self.skipped_head)}): "
            + (", ".join(self.skipped_head) if self.skipped_head else "none"),
        ]
        if self.missing_in_target:
            lines.append(f"  left for the target to initialise: {', '.join(self.missing_in_target)}")
        if self.usage:
            lines.append(f"  load with: {self.usage}")
        return "\n".join(lines)


def infer_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """The supported ResNet (RESNET_ARCHS) whose layout `state` has, or None: from shapes alone, no model built.

    Depth comes from the block kind and blocks per stage. The first block's 3x3 conv tells resnext and
    wide_resnet from resnet: it has groups x width-per-group outputs of width-per-group inputs each (one group
    of 64 in a plain ResNet, 32 groups of 4 or 8 in resnext, one group of 128 in wide_resnet). The stem does not
    enter, so small-image (3x3) stems are named too.
    """
    blocks = []
    for stage in range(1, 5):
        idx = {int(m.group(2)) for k in state if (m := _LAYER_RE.match(k)) and m.group(1) == str(stage)}
        blocks.append(max(idx) + 1 if idx else 0)
    kind = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
    depth, conv = _DEPTHS.get((kind, tuple(blocks))), state.get("layer1.0.conv2.weight")
    if depth is None or conv is None or conv.dim() != 4 or not conv.shape[1] or conv.shape[0] % conv.shape[1]:
        return None
    groups, per_group = conv.shape[0] // conv.shape[1], conv.shape[1]
    name = (f"resnext{depth}_{groups}x{per_group}d" if groups > 1
            else f"wide_resnet{depth}_{per_group // 64}" if per_group > 64 else f"resnet{depth}")
    return name if name in RESNET_ARCHS else None


def _reference_state(arch: str) -> dict[str, torch.Size]:
    """Names and shapes of torchvision's `arch` without its fc, built on the meta device (no memory, no init)."""
    if arch not in torchvision.models.list_models(module=torchvision.models) or not arch.startswith(
            ("resnet", "resnext", "wide_resnet")):
        raise CheckpointError(f"unsupported architecture {arch!r}: expected a torchvision ResNet")
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith("fc.")}


def shape_problems(expected: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading strictly where `expected` (tensors or shapes) stands: missing, unexpected
    and mis-shaped keys, as phrases for an error message (empty: it fits)."""
    return describe_key_mismatch({k: tuple(getattr(v, "shape", v)) for k, v in expected.items()},
                                 {k: tuple(v.shape) for k, v in state.items()})


def check_backbone(state: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    """Raise CheckpointError naming missing, unexpected and mis-shaped keys against torchvision's `arch`."""
    problems = shape_problems(_reference_state(arch), state)
    if problems:
        raise CheckpointError(f"{source}: query encoder does not match torchvision {arch}: " + "; ".join(problems))


def check_timm_backbone(state: Mapping[str, torch.Tensor], arch: str, source: str) -> None:
    """Raise CheckpointError unless `state` loads strictly into timm's `arch` without a classifier.

    timm's ResNets share torchvision's names and shapes today; this check (on the meta device: no memory, no
    init) keeps a future rename in timm from producing files that only fail at the user's load_state_dict.
    timm is optional (a test extra): without it the torchvision check stands alone.
    """
    try:
        import timm
    except ImportError:
        return
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as exc:  # an unknown name is a RuntimeError in timm
        raise CheckpointError(f"{source}: timm cannot build {arch!r} ({exc})") from exc
    problems = shape_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source}: query encoder does not match timm {arch} (num_classes=0): "
                              + "; ".join(problems))


def small_stem(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> bool:
    """Whether the weights have the small_images stem: the config says, else a 3x3 conv1 (official files)."""
    conv1 = state.get("conv1.weight")
    if "small_images" in config:
        return bool(config["small_images"])
    return conv1 is not None and conv1.dim() == 4 and conv1.shape[-1] == 3


def load_backbone(path: str | os.PathLike, arch: str | None = None, target: str | None = None) -> Backbone:
    """Read a MoCo checkpoint (this project's or an official release) with weights_only=True and validate it.

    `arch` overrides the checkpoint's own "arch" entry; without either it is inferred from the block layout.
    `target` "timm" refuses small-image stems with their own message (timm's ResNet stem is fixed at 7x7 stride
    2 with a max-pool, so those weights have no place there); other targets get the shape check's message.
    """
    ckpt = load_checkpoint(path)
    full = query_encoder_state(ckpt["state_dict"], source=f"checkpoint {path}", keep_head=True)
    state = {k: v for k, v in full.items() if not k.startswith("fc.")}
    skipped = sorted(k for k in full if k.startswith("fc."))
    config = ckpt.get("config") if isinstance(ckpt.get("config"), Mapping) else {}
    arch = arch or ckpt.get("arch") or infer_arch(state)
    if not arch:
        raise CheckpointError(f"checkpoint {path}: cannot tell the ResNet architecture (no 'arch' entry and "
                              f"no standard block layout); pass it explicitly")
    if target == "timm" and small_stem(state, config):
        raise CheckpointError(f"checkpoint {path}: pretrained with small_images=True (3x3 stride-1 stem, no "
                              f"max-pool), which timm's {arch} (7x7 stride-2 stem, max-pool) cannot hold; "
                              f"--to timm needs a checkpoint with the standard stem")
    check_backbone(state, arch, f"checkpoint {path}")
    if target == "timm":
        check_timm_backbone(state, arch, f"checkpoint {path}")
    epoch = ckpt.get("epoch")
    return Backbone(source=str(path), arch=str(arch), state=state, skipped_head=skipped,
                    epoch=int(epoch) if isinstance(epoch, int | torch.Tensor) else None, config=dict(config))


def detectron2_name(key: str) -> str:
    """torchvision ResNet key -> detectron2 ResNet key (stem.conv1.norm, res2..5, convN.norm, shortcut.norm)."""
    m = _LAYER_RE.match(key)
    if m is None:
        head, rest = "stem", key
    else:
        head, rest = f"res{int(m.group(1)) + 1}.{m.group(2)}", m.group(3)
    if bn := _BN_RE.match(rest):
        rest = f"conv{bn.group(1)}.norm.{bn.group(2)}"
    elif ds := _DOWNSAMPLE_RE.match(rest):
        rest = f"shortcut.{ds.group(2)}" if ds.group(1) == "0" else f"shortcut.norm.{ds.group(2)}"
    return f"{head}.{rest}"


def to_detectron2(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Rename every tensor and turn it into a numpy array (detectron2's pickle format holds numpy)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = detectron2_name(key)
        if name in out:
            raise CheckpointError(f"two keys map to detectron2 name {name!r}")
        out[name] = value.detach().cpu().numpy()
    return out


def detectron2_payload(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The dict detectron2's checkpointer reads as a non-Caffe2 pickle with suffix matching on."""
    return {"model": to_detectron2(state), "__author__": D2_AUTHOR, "matching_heuristics": True}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, scalars and numpy arrays: a detectron2 weights file needs nothing else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def read_detectron2_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Read a detectron2 .pkl weights file the user passed explicitly as such.

    Pickle is the format detectron2 defines for these files; we unpickle with an allow-list of numpy types only,
    so a hostile file fails instead of running code. Returns the dict with its "model" mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"detectron2 weights {path}: file not found")
    try:
        with open(path, "rb") as f:
            obj = _NumpyUnpickler(f, encoding="latin1").load()
    except Exception as exc:
        raise CheckpointError(f"detectron2 weights {path}: not a readable detectron2 pickle "
                              f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("model", obj.get("blobs")), dict):
        raise CheckpointError(f"detectron2 weights {path}: expected a dict with a 'model' mapping")
    return obj


def _write_pickle(obj: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def safetensors_metadata(bb: Backbone, target: str) -> dict[str, str]:
    """The header metadata of a converted safetensors file (all strings, as the format requires).

    arch, source, epoch and target say what the file is; image_size, data and preset (from the pretraining
    config, when present) let `moco eval` read it with the checkpoint's own defaults.
    """
    meta = {"format": "pt", "written_by": "moco_transfer.convert", "target": target, "arch": bb.arch,
            "source": bb.source}
    if bb.epoch is not None:
        meta["epoch"] = str(bb.epoch)
    for key in _CONFIG_METADATA:
        if bb.config.get(key) is not None:
            meta[key] = str(bb.config[key])
    return meta


def _usage(target: str, arch: str, output: Path) -> str:
    """The line that loads `output` into its target, for the summary."""
    read = (f"safetensors.torch.load_file({str(output)!r})" if is_safetensors(output)
            else f"torch.load({str(output)!r}, weights_only=True)")
    if target == "timm":
        return f"model = timm.create_model({arch!r}, pretrained=False, num_classes=0); model.load_state_dict({read})"
    if target == "torchvision":
        return f"model = torchvision.models.{arch}(); model.fc = torch.nn.Identity(); model.load_state_dict({read})"
    return ""


def convert(checkpoint: str | os.PathLike, output: str | os.PathLike, target: str = "detectron2",
            force: bool = False, arch: str | None = None) -> ConversionSummary:
    """Convert `checkpoint` to `target` at `output`; refuses to overwrite an existing file unless `force`.

    An output named `*.safetensors` is written with safetensors (torchvision and timm targets only: detectron2
    reads its weights from a pickle); any other name gets a pickle.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    output = Path(output)
    if target == "detectron2" and is_safetensors(output):
        raise ValueError(f"output {output}: detectron2 reads converted weights from a pickle (.pkl), not "
                         f"safetensors; name it e.g. {output.with_suffix('.pkl').name}, or pass --to torchvision "
                         f"or --to timm for a safetensors file")
    if output.exists() and not force:
        raise FileExistsError(f"output {output} exists; pass --force to overwrite it")
    if output.exists() and output.is_dir():
        raise IsADirectoryError(f"output {output} is a folder; expected a file path")
    bb = load_backbone(checkpoint, arch=arch, target=target)
    missing: list[str] = []
    if target == "detectron2":
        payload = detectron2_payload(bb.state)
        _write_pickle(payload, output)
        written = payload["model"]
    else:
        written = {k: v.detach().cpu().clone() for k, v in bb.state.items()}
        if is_safetensors(output):
            atomic_save_safetensors(written, output, safetensors_metadata(bb, target))
        else:
            atomic_save(written, output)
        # torchvision's model always has an fc; timm's with num_classes=0 has none, so nothing is left over
        missing = ["fc.weight", "fc.bias"] if target == "torchvision" else []
    tensors = len(written)
    params = sum(int(np.prod(v.shape)) for k, v in written.items() if "running_" not in k
                 and "num_batches_tracked" not in k)
    return ConversionSummary(source=str(checkpoint), output=str(output), target=target, arch=bb.arch,
                             epoch=bb.epoch, tensors=tensors, parameters=params, skipped_head=bb.skipped_head,
                             missing_in_target=missing, usage=_usage(target, bb.arch, output))
