"""Image sources besides class folders: `.txt` file lists and flat folders, scanned once per run.

A list holds one `path [label]` per line (relative paths from the list's folder; blank lines and `#` comments
skipped). A folder of images without class subfolders is one unlabelled set: pretraining takes it, the
evaluators refuse it because they need labels. Under torchrun every rank would otherwise walk the same tree
(ImageNet: 1.28 million stat calls each); `scan_once` lets rank 0 scan and broadcast the result.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .data import IMG_EXTENSIONS, DataError, resolve_split, scan_class_folders

T = TypeVar("T")
LIST_SUFFIX = ".txt"
NEEDS_LABELS = ("the evaluators need labels: class subfolders (train/ and val/), `path label` lists, "
                "or a named set such as cifar10")


@dataclass
class SampleList:
    """What a dataset of files reads: `(path, target)` samples (target -1 when unlabelled) and the class names."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]
    labelled: bool


def is_file_list(data: str | os.PathLike | None) -> bool:
    return data is not None and str(data).lower().endswith(LIST_SUFFIX) and not Path(data).is_dir()


def _class_order(labels: list[str]) -> list[str]:
    """Integer labels in numeric order (2 before 10), names in sorted order."""
    unique = set(labels)
    try:
        return sorted(unique, key=int)
    except ValueError:
        return sorted(unique)


def read_file_list(path: str | os.PathLike) -> SampleList:
    """The samples of a `path [label]` list; a line naming a missing file is an error that gives its number.

    A line that is itself an existing file's path is unlabelled (paths with spaces); otherwise its last
    whitespace-separated field is the label. All lines are labelled or none is.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: list file not found")
    base = path.parent
    entries: list[tuple[int, str, str | None]] = []
    missing: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, label = line, None
            if not (base / line).is_file() and len(line.split()) > 1:
                name, label = line.rsplit(None, 1)
            if not (base / name).is_file():
                missing.append(f"line {number}: {name}")
                continue
            entries.append((number, str(base / name), label))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DataError(f"--data {path}: no such file at {'; '.join(missing[:3])}{more}; relative paths are taken "
                        f"from {base}")
    if not entries:
        raise DataError(f"--data {path}: the list names no files (one `path [label]` per line)")
    labelled = [e for e in entries if e[2] is not None]
    if labelled and len(labelled) != len(entries):
        first = entries[0]
        odd = next(e for e in entries if (e[2] is None) != (first[2] is None))
        kind = {True: "unlabelled", False: "labelled"}
        raise DataError(f"--data {path}: line {first[0]} is {kind[first[2] is None]} but line {odd[0]} is "
                        f"{kind[odd[2] is None]}; label all lines or none")
    if not labelled:
        return SampleList(path, [], [(p, -1) for _, p, _ in entries], labelled=False)
    classes = _class_order([e[2] for e in labelled])  # type: ignore[misc]
    index = {c: i for i, c in enumerate(classes)}
    return SampleList(path, classes, [(p, index[label]) for _, p, label in entries], labelled=True)  # type: ignore[index]


def flat_images(root: Path) -> list[str]:
    """The image files directly in `root` (sorted), for a folder without class subfolders."""
    return sorted(e.path for e in os.scandir(root) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))


def _has_subfolders(root: Path) -> bool:
    return any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root))


def scan_images(root: Path, need_labels: bool) -> SampleList:
    """Class folders as before; a folder of images without subfolders is one unlabelled set."""
    if not _has_subfolders(root):
        images = flat_images(root)
        if images and need_labels:
            raise DataError(f"--data {root}: {len(images)} images without class subfolders; {NEEDS_LABELS}")
        if images:
            return SampleList(root, [], [(p, -1) for p in images], labelled=False)
    classes, samples = scan_class_folders(root)
    return SampleList(root, classes, samples, labelled=True)


def pretrain_samples(data: str | os.PathLike) -> SampleList:
    """What pretraining reads: a list, or a folder (its train/ when present) of class folders or images."""
    if is_file_list(data):
        return read_file_list(data)
    return scan_images(resolve_split(data, "train"), need_labels=False)


def _labelled_list(path: Path) -> SampleList:
    found = read_file_list(path)
    if not found.labelled:
        raise DataError(f"--data {path}: the list has no labels (lines are `path label`); {NEEDS_LABELS}")
    return found


def companion_list(path: Path) -> Path:
    """The evaluators' second list beside `path`: its name with `train` replaced by `val`, else by `test`."""
    name = path.name
    at = name.lower().rfind("train")
    candidates = [path.with_name(name[:at] + other + name[at + 5:]) for other in ("val", "test")] if at >= 0 else []
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    wanted = " or ".join(c.name for c in candidates) or "a name with 'train' in it, e.g. train.txt beside val.txt"
    raise DataError(f"--data {path}: the evaluators need a second list for the queries / evaluation set: "
                    f"expected {wanted} beside it")


def eval_samples(data: str | os.PathLike) -> tuple[SampleList, SampleList]:
    """Train and val samples, both labelled: `train.txt` with its `val.txt` (or `test.txt`), or a folder with
    train/ and val/ class folders."""
    if is_file_list(data):
        path = Path(data)
        return _labelled_list(path), _labelled_list(companion_list(path))
    root = Path(data)
    if root.is_dir() and not (root / "train").is_dir() and not _has_subfolders(root) and flat_images(root):
        raise DataError(f"--data {root}: images without class subfolders; {NEEDS_LABELS}")
    return (scan_images(resolve_split(root, "train", required=True), need_labels=True),
            scan_images(resolve_split(root, "val", required=True), need_labels=True))


def scan_once(scan: Callable[[], T], all_ranks: bool) -> T:
    """`scan()` on rank 0 only, its result (or its error) broadcast to the others, when every rank calls this.

    Without a process group, or when only some ranks make the call (`all_ranks` False: the kNN monitor runs on
    rank 0 alone), this is just `scan()`.
    """
    from . import distributed as du

    if not (all_ranks and du.is_distributed()):
        return scan()
    import torch.distributed as dist

    payload: list[object] = [None]
    error: BaseException | None = None
    if du.rank() == 0:
        try:
            payload[0] = ("ok", scan())
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of any failure, or they wait forever
            error = exc
            payload[0] = ("error", str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    kind, value = payload[0]  # type: ignore[misc]
    if kind == "error":
        raise DataError(f"rank 0: {value}")
    return value  # type: ignore[return-value]
