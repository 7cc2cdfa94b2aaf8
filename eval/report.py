"""Pictures for a person to look at: the linear probe's accuracy curve and a kNN retrieval gallery."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def save_curve(xs: Sequence[float], series: dict[str, Sequence[float]], path: str | os.PathLike, xlabel: str,
               title: str, log_x: bool = False) -> Path:
    """One line per series (e.g. top-1 and top-5 per epoch) in a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, ys in series.items():
        ax.plot(list(xs), list(ys), marker="o" if len(xs) <= 30 else None, label=name)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_gallery(queries: Sequence[Image.Image], query_labels: Sequence[str],
                 neighbours: Sequence[Sequence[Image.Image]], neighbour_labels: Sequence[Sequence[str]],
                 similarities: Sequence[Sequence[float]], path: str | os.PathLike) -> Path:
    """Grid: a query per row, then its nearest training images; green titles match the query's class."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows, cols = len(queries), 1 + max((len(n) for n in neighbours), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), dpi=100, squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.imshow(np.asarray(queries[r].convert("RGB")))
                ax.set_title(f"query: {query_labels[r]}", fontsize=7, fontweight="bold")
                for spine in ax.spines.values():
                    spine.set_linewidth(2.5)
            elif c - 1 < len(neighbours[r]):
                label = neighbour_labels[r][c - 1]
                ax.imshow(np.asarray(neighbours[r][c - 1].convert("RGB")))
                colour = "green" if label == query_labels[r] else "red"
                ax.set_title(f"{label} {similarities[r][c - 1]:.3f}", fontsize=7, color=colour)
            else:
                ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
