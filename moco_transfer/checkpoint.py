"""MoCo checkpoints in the official layout, written atomically and read as untrusted files.

Layout: {"epoch": completed epochs, "arch": str, "state_dict": {"module.encoder_q.*", "module.encoder_k.*",
"module.queue", "module.queue_ptr"}, "optimizer": ...} plus this project's "scaler", "config", "history".
Converted backbones may also be safetensors files (`*.safetensors`): flat tensors plus string metadata in the
header, no pickle at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .fileio import atomic_open

PREFIX_Q = "module.encoder_q."
SAFETENSORS_SUFFIX = ".safetensors"
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


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether `path` names a safetensors file: the name decides, as for writers and readers alike."""
    return Path(path).name.lower().endswith(SAFETENSORS_SUFFIX)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` as a safetensors file through atomic_open, so a killed run never leaves half a file.

    The tensors are copied to contiguous CPU memory first: safetensors refuses shared or strided storage.
    Metadata values must be strings (the format's header holds a str -> str map).
    """
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    data = safetensors_bytes(flat, metadata=dict(metadata) if metadata else None)
    with atomic_open(path, "wb") as f:
        f.write(data)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, or a CheckpointError naming the file and the fault.

    safetensors checks the header (length, JSON, dtypes, offsets covering the file exactly) before any tensor is
    read, so a truncated or tampered header fails here; its Rust errors are turned into one-line messages.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights {path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError mostly; OSError for unreadable files: one line, never a traceback
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"weights {path}: not a valid safetensors file: {_safetensors_fault(detail)} "
                              f"({detail})") from exc
    if not tensors:
        raise CheckpointError(f"weights {path}: the safetensors file holds no tensors")
    return tensors, metadata


# safetensors' header errors -> what they mean for the user's file
_SAFETENSORS_FAULTS = (
    ("header too small", "the file is shorter than the 8-byte header length (empty or truncated)"),
    ("invalid header length", "the header length points past the end of the file (truncated or corrupted)"),
    ("header too large", "the header length is implausible (a torch.save or pickle file under a .safetensors name?)"),
    ("not fully covered", "the tensor data does not fill the file exactly (truncated, or bytes appended)"),
    ("invalid utf-8", "the header is not valid text (corrupted or tampered)"),
    ("invalid json", "the header is not valid safetensors JSON (corrupted or tampered)"),
    ("invalid shape", "a tensor's shape, dtype or offsets disagree with its data (corrupted or tampered)"),
    ("invalid offset", "a tensor's offsets disagree with the data (corrupted or tampered)"),
)


def _safetensors_fault(detail: str) -> str:
    low = detail.lower()
    return next((meaning for phrase, meaning in _SAFETENSORS_FAULTS if phrase in low),
                "unreadable (truncated, corrupted or another format)")


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
