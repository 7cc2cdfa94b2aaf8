"""File writing that never leaves half a file behind, and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A temporary file beside `path`, fsynced and renamed over it on success, removed on any failure.

    A run killed while writing leaves the previous `path` intact. The file gets the mode a plain `open` would
    give it under the user's umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; teammates read results as with a plain open
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere only by setting it (set and restored at once, which
    another thread creating a file in between would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(obj: Any, path: str | os.PathLike, default: Callable[[Any], Any] | None = None) -> None:
    """The one writer of result files: atomic (a crash never leaves half a file), and a non-finite number (a diverged
    loss, the mAP of no scored query) as null, which strict readers accept; the record says why in another field."""
    with atomic_open(path, "w") as f:
        json.dump(_finite(obj), f, indent=2, allow_nan=False, default=default)
        f.write("\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return [_finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes: an identity that survives copies and renames but not retraining."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_key_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and mis-shaped tensor names, as short phrases for an error message (empty: match)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k} {found[k]} vs expected {expected[k]}"
                    for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:6])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:6])})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:4])})")
    return problems
