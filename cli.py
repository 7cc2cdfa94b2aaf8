"""The `moco` command: pretrain, convert, eval linear|knn|voc.

Installed as `moco_transfer.cli`; commands are thin: they parse options and call the package's modules.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="moco-transfer")
def main() -> None:
    """Pretrain MoCo v2 ResNet encoders and measure them (linear, kNN, VOC detection)."""


@main.group("eval")
def eval_group() -> None:
    """Evaluate a pretrained checkpoint: linear classification, kNN retrieval, VOC detection."""


# --- pretrain -------------------------------------------------------------------------------------------


# --- convert --------------------------------------------------------------------------------------------


# --- eval linear ----------------------------------------------------------------------------------------


# --- eval knn -------------------------------------------------------------------------------------------


# --- eval voc -------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
