"""Where the VOC datasets live: the expected folder layout, its check, and our dataset names. No detectron2.

detectron2 registers `voc_2007_trainval` etc. at import time under $DETECTRON2_DATASETS. Rather than depend on
that variable, `moco eval voc --voc-root DIR` registers each VOC name a config uses again as `moco_<name>`,
pointing at DIR, and rewrites the config's DATASETS to those names; everything else in the config is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

PREFIX = "moco_"
# detectron2's builtin VOC names -> (folder under the VOC root, image-set split, year)
VOC_SPLITS: dict[str, tuple[str, str, int]] = {
    f"voc_{year}_{split}": (f"VOC{year}", split, year)
    for year in (2007, 2012) for split in ("trainval", "train", "val", "test") if (year, split) != (2012, "test")
}
EXPECTED_LAYOUT = """expected layout (the VOCdevkit folder of the official tars):
  DIR/VOC2007/JPEGImages/*.jpg
  DIR/VOC2007/Annotations/*.xml
  DIR/VOC2007/ImageSets/Main/trainval.txt, test.txt
  DIR/VOC2012/JPEGImages/*.jpg
  DIR/VOC2012/Annotations/*.xml
  DIR/VOC2012/ImageSets/Main/trainval.txt"""


class VocLayoutError(FileNotFoundError):
    """The VOC root lacks folders, split files, images or annotations; the message lists them."""


def our_name(name: str) -> str:
    """The name under which a builtin VOC dataset is registered at --voc-root (unknown names pass through)."""
    return PREFIX + name if name in VOC_SPLITS else name


def voc_names(names: Iterable[str]) -> list[str]:
    """The builtin VOC dataset names among `names` (our prefixed ones map back to the builtin)."""
    out = []
    for n in names:
        base = n.removeprefix(PREFIX)
        if base in VOC_SPLITS and base not in out:
            out.append(base)
    return out


def check_voc_root(root: str | os.PathLike, names: Iterable[str], max_listed: int = 5) -> dict[str, int]:
    """Verify every image and annotation of the VOC datasets `names` exists under `root`.

    Returns the number of images per dataset. All problems are collected into one VocLayoutError, so a user
    fixes the layout in one go instead of meeting the failures one by one mid-training.
    """
    root = Path(root)
    if not root.is_dir():
        raise VocLayoutError(f"--voc-root {root}: not a folder\n{EXPECTED_LAYOUT}")
    problems: list[str] = []
    counts: dict[str, int] = {}
    for name in voc_names(names):
        folder, split, _ = VOC_SPLITS[name]
        base = root / folder
        split_file = base / "ImageSets" / "Main" / f"{split}.txt"
        missing_dirs = [str(base / d) for d in ("JPEGImages", "Annotations") if not (base / d).is_dir()]
        if missing_dirs:
            problems.append(f"{name}: missing folder(s) {', '.join(missing_dirs)}")
            continue
        if not split_file.is_file():
            problems.append(f"{name}: missing split file {split_file}")
            continue
        ids = split_file.read_text().split()
        if not ids:
            problems.append(f"{name}: split file {split_file} lists no images")
            continue
        lost = [i for i in ids if not (base / "JPEGImages" / f"{i}.jpg").is_file()
                or not (base / "Annotations" / f"{i}.xml").is_file()]
        if lost:
            problems.append(f"{name}: {len(lost)} of {len(ids)} ids in {split_file} lack JPEGImages/<id>.jpg or "
                            f"Annotations/<id>.xml (e.g. {', '.join(lost[:max_listed])})")
            continue
        counts[name] = len(ids)
    if problems:
        raise VocLayoutError(f"--voc-root {root}: " + "; ".join(problems) + "\n" + EXPECTED_LAYOUT)
    return counts
