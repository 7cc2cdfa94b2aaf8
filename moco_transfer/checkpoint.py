"""MoCo checkpoints in the official layout, written atomically and read as untrusted files.

Layout: {"epoch": completed epochs, "arch": str, "state_dict": {"module.encoder_q.*", "module.encoder_k.*",
"module.queue", "module.queue_ptr"}, "optimizer": ...} plus this project's "scaler", "config", "history".
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_open

PREFIX_Q = "module.encoder_q."
CHECKPOINT_RE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


class CheckpointError(ValueError):
    """A file that is not a usable MoCo checkpoint; the message names the file and what is missing."""


def checkpoint_name(epoch: int) -> str:
    """Official naming: `checkpoint_0199.pth.tar` after the 200th epoch (0-based index of the last one)."""
    return f"checkpoint_{epoch:04d}.pth.tar"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through a temporary file and rename: a run killed while saving keeps the previous file."""
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True; the result is a dict with a `state_dict` (bare state dicts are wrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path}: not a loadable PyTorch file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    if "state_dict" not in obj:
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = {"state_dict": dict(obj)}
        else:
            raise CheckpointError(f"checkpoint {path}: no 'state_dict' entry (keys: {sorted(obj)[:8]})")
    return dict(obj)


def with_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as a DDP save has them (`module.encoder_q.*`), whether or not the run was distributed."""
    return {k if k.startswith("module.") else f"module.{k}": v for k, v in state_dict.items()}


def without_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def query_encoder_state(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint",
                        keep_head: bool = False) -> dict[str, torch.Tensor]:
    """The query encoder's tensors with the prefix stripped; `fc.*` (the projection head) dropped by default.

    Accepts `module.encoder_q.*` and the non-DDP `encoder_q.*`. A state dict without them is an error, so no
    caller can silently load nothing.
    """
    sd = with_module_prefix(state_dict)
    out = {k[len(PREFIX_Q):]: v for k, v in sd.items() if k.startswith(PREFIX_Q)}
    if not out:
        raise CheckpointError(
            f"{source}: no query-encoder keys (expected 'module.encoder_q.*' or 'encoder_q.*'; "
            f"found e.g. {sorted(state_dict)[:5]})")
    if not keep_head:
        out = {k: v for k, v in out.items() if not k.startswith("fc.")}
    return out


def find_latest(folder: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest epoch number in `folder`, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return max(found)[1] if found else None
