"""Learning curves of a pretraining run (loss, instance-discrimination acc1, lr, kNN top-1) as one PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moco_transfer.fileio import atomic_open  # noqa: E402

PANELS = (
    ("loss", "InfoNCE loss"),
    ("acc1", "instance-discrimination acc1 (%)"),
    ("lr", "learning rate"),
    ("knn_top1", "kNN top-1 (%)"),
)


def save_pretrain_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "",
                         chance_loss: float | None = None, random_init_knn: float | None = None) -> Path:
    """Four panels against the epoch; kNN points only where the monitor ran. Written atomically.

    `chance_loss` (ln(K+1): the loss of uniform logits) and `random_init_knn` are drawn as dashed references,
    so a reader sees at a glance whether the run learned anything.
    """
    path = Path(path)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=100)
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        points = [(r["epoch"], r[key]) for r in history if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key])]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3)
        if key == "loss" and chance_loss is not None:
            ax.axhline(chance_loss, color="grey", linestyle="--", linewidth=1, label="ln(K+1): uniform logits")
            ax.legend(fontsize=7)
        if key == "knn_top1" and random_init_knn is not None:
            ax.axhline(random_init_knn, color="grey", linestyle="--", linewidth=1, label="random weights")
            ax.legend(fontsize=7)
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
