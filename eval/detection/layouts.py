"""Where the datasets live: each benchmark's folder layout, its check, our dataset names and their registration.

detectron2 registers `voc_2007_trainval`, `coco_2017_train` etc. at import time under $DETECTRON2_DATASETS.
Rather than depend on that variable, `moco eval voc --voc-root DIR` and `moco eval coco --coco-root DIR` register
each builtin name a config uses again as `moco_<name>`, pointing at DIR, and rewrite the config's DATASETS to
those names; everything else in the config is untouched. The checks run before training (no detectron2 needed)
and name every missing file; the registrations (`register_voc`, `register_coco`) import detectron2 lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


# detectron2's builtin COCO 2017 instance names -> (image folder, annotation file), both under the COCO root
COCO_SPLITS: dict[str, tuple[str, str]] = {
    f"coco_2017_{split}": (f"{split}2017", f"annotations/instances_{split}2017.json") for split in ("train", "val")
}
COCO_EXPECTED_LAYOUT = """expected layout (detectron2's, as under $DETECTRON2_DATASETS/coco):
  DIR/annotations/instances_train2017.json
  DIR/annotations/instances_val2017.json
  DIR/train2017/*.jpg
  DIR/val2017/*.jpg"""


class LayoutError(FileNotFoundError):
    """A dataset root lacks folders, files, images or annotations; the message lists them."""


def our_name(name: str, builtin: Iterable[str] = VOC_SPLITS) -> str:
    """The name under which a builtin dataset of one benchmark (`builtin`: VOC_SPLITS, COCO_SPLITS) is registered
    at the user's root; other names pass through to detectron2's own registrations."""
    return PREFIX + name if name in builtin else name


def _builtin_names(names: Iterable[str], known: Iterable[str]) -> list[str]:
    known = set(known)
    out = []
    for n in names:
        base = n.removeprefix(PREFIX)
        if base in known and base not in out:
            out.append(base)
    return out


def voc_names(names: Iterable[str]) -> list[str]:
    """The builtin VOC dataset names among `names` (our prefixed ones map back to the builtin)."""
    return _builtin_names(names, VOC_SPLITS)


def coco_names(names: Iterable[str]) -> list[str]:
    """The builtin COCO 2017 instance dataset names among `names` (our prefixed ones map back to the builtin)."""
    return _builtin_names(names, COCO_SPLITS)


def check_voc_root(root: str | os.PathLike, names: Iterable[str], max_listed: int = 5) -> dict[str, int]:
    """Verify every image and annotation of the VOC datasets `names` exists under `root`.

    Returns the number of images per dataset. All problems are collected into one LayoutError, so a user
    fixes the layout in one go instead of meeting the failures one by one mid-training.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"--voc-root {root}: not a folder\n{EXPECTED_LAYOUT}")
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
        raise LayoutError(f"--voc-root {root}: " + "; ".join(problems) + "\n" + EXPECTED_LAYOUT)
    return counts


def voc_defining_files(root: str | os.PathLike, names: Iterable[str]) -> dict[str, Path]:
    """The file that says which images a VOC dataset holds: its split file (ImageSets/Main/<split>.txt)."""
    return {name: Path(root) / VOC_SPLITS[name][0] / "ImageSets" / "Main" / f"{VOC_SPLITS[name][1]}.txt"
            for name in voc_names(names)}


def coco_defining_files(root: str | os.PathLike, names: Iterable[str]) -> dict[str, Path]:
    """The file that says which images and annotations a COCO dataset holds: its instances JSON."""
    return {name: Path(root) / COCO_SPLITS[name][1] for name in coco_names(names)}


def _read_coco_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise LayoutError(f"{path}: not a COCO instances file (expected lists 'images', 'annotations' and "
                          "'categories')")
    return data


def check_coco_root(root: str | os.PathLike, names: Iterable[str], max_listed: int = 5
                    ) -> tuple[dict[str, int], int | None]:
    """Verify the annotation file and every image it names exist for each COCO dataset in `names`.

    Returns (images per dataset, number of categories; None without a COCO dataset). The annotation files are
    read whole (COCO train2017's is 448 MB, some seconds), because a file that names an image missing from the
    image folder otherwise fails hours later in the middle of training. All problems go into one LayoutError.
    Datasets whose categories differ (train vs. test) are an error too: the model has one classifier.
    """
    root = Path(root)
    wanted = coco_names(names)
    if not root.is_dir():
        raise LayoutError(f"--coco-root {root}: not a folder\n{COCO_EXPECTED_LAYOUT}")
    problems: list[str] = []
    counts: dict[str, int] = {}
    categories: dict[str, list[int]] = {}
    for name in wanted:
        folder, ann = COCO_SPLITS[name]
        ann_path, image_dir = root / ann, root / folder
        missing = [str(p) for p in (ann_path, image_dir) if not p.exists()]
        if missing:
            problems.append(f"{name}: missing {', '.join(missing)}")
            continue
        data = _read_coco_json(ann_path)
        files = [str(im.get("file_name", "")) for im in data["images"]]
        if not files:
            problems.append(f"{name}: {ann_path} lists no images")
            continue
        lost = [f for f in files if not f or not (image_dir / f).is_file()]
        if lost:
            problems.append(f"{name}: {ann_path} names {len(lost)} of {len(files)} images that are not in "
                            f"{image_dir} (e.g. {', '.join(lost[:max_listed])})")
            continue
        counts[name] = len(files)
        categories[name] = sorted(int(c["id"]) for c in data["categories"])
    if problems:
        raise LayoutError(f"--coco-root {root}: " + "; ".join(problems) + "\n" + COCO_EXPECTED_LAYOUT)
    if len({tuple(c) for c in categories.values()}) > 1:
        raise LayoutError(f"--coco-root {root}: the annotation files have different categories ("
                          + ", ".join(f"{n}: {len(c)}" for n, c in categories.items()) + "); one model needs one set")
    classes = len(next(iter(categories.values()))) if categories else None
    return counts, classes


# --- registration with detectron2 (imported lazily) ----------------------------------------------------------


def _reregister(name: str, key: str, value: str) -> bool:
    """True if `name` is registered already with metadata `key` == `value`; else drop any stale registration."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return False
    if getattr(MetadataCatalog.get(name), key, None) == value:
        return True
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    return False


def register_voc(voc_root: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Register `moco_<name>` for each builtin VOC name in `names`, rooted at `voc_root`; idempotent."""
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc

    done = []
    for name in voc_names(names):
        folder, split, year = VOC_SPLITS[name]
        ours, dirname = our_name(name), str((Path(voc_root) / folder).resolve())
        if not _reregister(ours, "dirname", dirname):
            register_pascal_voc(ours, dirname, split, year)
            MetadataCatalog.get(ours).evaluator_type = "pascal_voc"
        done.append(ours)
    return done


def register_coco(coco_root: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Register `moco_<name>` for each builtin COCO name in `names`, rooted at `coco_root`; idempotent.

    The metadata (class names, the category-id map COCOEvaluator needs) comes from the annotation file when
    detectron2 loads it, not from detectron2's builtin COCO list: a file with other categories then still works.
    """
    from detectron2.data.datasets import register_coco_instances

    done = []
    for name in coco_names(names):
        folder, ann = COCO_SPLITS[name]
        ours, root = our_name(name, COCO_SPLITS), Path(coco_root).resolve()
        json_file = str(root / ann)
        if not _reregister(ours, "json_file", json_file):
            register_coco_instances(ours, {}, json_file, str(root / folder))
        done.append(ours)
    return done
