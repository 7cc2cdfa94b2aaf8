"""detectron2 YAML configs of the MoCo detection protocol, shipped as package data.

`config_path(name)` gives a real file path, which detectron2's `merge_from_file` needs to resolve `_BASE_`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BASE = "Base-RCNN-C4-BN.yaml"
BASE_FPN = "Base-RCNN-FPN-BN.yaml"
VOC_24K = "voc_R_50_C4_24k_moco.yaml"
COCO_C4_1X = "coco_R_50_C4_1x_moco.yaml"
COCO_C4_2X = "coco_R_50_C4_2x_moco.yaml"
COCO_FPN_1X = "coco_R_50_FPN_1x_moco.yaml"
COCO_FPN_2X = "coco_R_50_FPN_2x_moco.yaml"


def available_configs() -> list[str]:
    """File names of the shipped configs."""
    return sorted(p.name for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def config_path(name: str) -> Path:
    """Path of a shipped config by file name (with or without `.yaml`); KeyError lists the choices."""
    file = name if name.endswith(".yaml") else f"{name}.yaml"
    if file not in available_configs():
        raise KeyError(f"no shipped detection config {name!r}; choices: {', '.join(available_configs())}")
    path = resources.files(__name__) / file
    if not isinstance(path, Path):  # installed inside a zip: detectron2 needs real files for _BASE_
        raise RuntimeError(f"detection config {file} is not a plain file ({path}); install the package unzipped")
    return path


def resolve_config(name_or_path: str) -> Path:
    """A shipped config name, or a path to the user's own detectron2 YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate.resolve()
    try:
        return config_path(name_or_path)
    except KeyError as exc:
        raise FileNotFoundError(f"config {name_or_path!r}: neither a file nor a shipped config "
                                f"({', '.join(available_configs())})") from exc
