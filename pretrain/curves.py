"""Learning curves of a pretraining run (loss, instance-discrimination acc1, lr, kNN and online-probe top-1)."""

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
    (("loss",), "InfoNCE loss"),
    (("acc1",), "instance-discrimination acc1 (%)"),
    (("lr",), "learning rate"),
    (("knn_top1", "online_probe_top1"), "kNN monitor / online probe top-1 (%)"),
)
SERIES = {"knn_top1": "kNN monitor", "online_probe_top1": "online linear probe (training stream)"}


def save_pretrain_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "",
                         chance_loss: float | None = None, random_init_knn: float | None = None) -> Path:
    """Four panels against the epoch; kNN points only where the monitor ran, probe points where it ran. Written
    atomically.

    `chance_loss` (ln(K+1): the loss of uniform logits) and `random_init_knn` are drawn as dashed references,
    so a reader sees at a glance whether the run learned anything.
    """
    path = Path(path)
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=100)
    for ax, (keys, label) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in history if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key])]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3, label=SERIES.get(key))
        if "loss" in keys and chance_loss is not None:
            ax.axhline(chance_loss, color="grey", linestyle="--", linewidth=1, label="ln(K+1): uniform logits")
        if "knn_top1" in keys and random_init_knn is not None:
            ax.axhline(random_init_knn, color="grey", linestyle="--", linewidth=1, label="random weights (kNN)")
        if ax.get_legend_handles_labels()[0]:
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
