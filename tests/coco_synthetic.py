"""A tiny COCO-format tree written by tests, in detectron2's layout: a few images, 3 categories, polygon masks.

root/annotations/instances_{train,val}2017.json and root/{train,val}2017/*.jpg. The category ids are not
1..3 (2, 5, 9), as COCO's are not 1..80, so the mapping to the model's classes is exercised. Each object is a
filled polygon (a triangle or a quadrilateral) drawn in its own colour, with its polygon as the mask, its box
and area from the polygon; sizes vary so COCO's small and medium ranges both occur.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

CATEGORIES = [{"id": 2, "name": "circle-ish", "supercategory": "shape"},
              {"id": 5, "name": "square-ish", "supercategory": "shape"},
              {"id": 9, "name": "triangle", "supercategory": "shape"}]
# The detectron2 overrides that keep a COCO trial to CPU seconds, on top of voc_synthetic.TINY.
TINY_COCO = ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", "8",
             "MODEL.ROI_MASK_HEAD.CONV_DIM", "16"]


def _polygon(rng: random.Random, w: int, h: int, category: int) -> list[float]:
    size = rng.choice([14, 20, 40, 48])  # areas on both sides of COCO's 32 x 32 "small" limit
    x0, y0 = rng.randrange(0, w - size), rng.randrange(0, h - size)
    if category == 9:
        pts = [(x0, y0 + size), (x0 + size / 2, y0), (x0 + size, y0 + size)]
    else:
        pts = [(x0, y0), (x0 + size, y0), (x0 + size, y0 + size), (x0, y0 + size)]
    return [float(c) for p in pts for c in p]


def _area(poly: list[float]) -> float:
    xs, ys = poly[0::2], poly[1::2]
    return abs(sum(xs[i] * ys[(i + 1) % len(xs)] - xs[(i + 1) % len(xs)] * ys[i] for i in range(len(xs)))) / 2


def write_coco(root: Path, n_train: int = 4, n_val: int = 2, width: int = 96, height: int = 72,
               seed: int = 0) -> Path:
    """Write the tree under `root`; every category appears in both splits."""
    rng = random.Random(seed)
    ann_id = 0
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        folder = root / f"{split}2017"
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image_id = (1 if split == "train" else 1001) + i
            name = f"{image_id:012d}.jpg"
            img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
            draw = ImageDraw.Draw(img)
            for j in range(3):
                cat = CATEGORIES[(i + j) % len(CATEGORIES)]["id"]
                poly = _polygon(rng, width, height, cat)
                draw.polygon(list(zip(poly[0::2], poly[1::2], strict=True)),
                             fill=tuple(rng.randrange(256) for _ in range(3)))
                xs, ys = poly[0::2], poly[1::2]
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": [poly],
                                    "area": _area(poly), "bbox": [min(xs), min(ys), max(xs) - min(xs),
                                                                  max(ys) - min(ys)], "iscrowd": 0})
            img.save(folder / name, quality=90)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        data = {"info": {"description": "synthetic"}, "licenses": [], "images": images, "annotations": annotations,
                "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(data))
    return root
