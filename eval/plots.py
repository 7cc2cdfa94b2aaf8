"""Pictures for a person to look at: the linear probe's accuracy curve, a kNN retrieval gallery and the bar
chart of `moco report`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from moco_transfer.fileio import atomic_open  # noqa: E402


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


def save_bars(groups: Sequence[str], series: dict[str, Sequence[tuple[float, float] | None]],
              path: str | os.PathLike, title: str, ylabel: str = "accuracy / AP (%)") -> Path:
    """Grouped bars (one group per table row, one bar per column) with std error bars; None draws no bar.

    Written through a temporary file and a rename, like every other result file.
    """
    path = Path(path)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    width_in = min(16.0, max(6.0, 3.0 + 0.4 * len(groups) * max(1, len(names)) ** 0.5))
    fig, ax = plt.subplots(figsize=(width_in, 4.5), dpi=100)
    for i, name in enumerate(names):
        points = [(g, v) for g, v in enumerate(series[name]) if v is not None]
        if not points:
            continue
        xs = [g - 0.4 + width * (i + 0.5) for g, _ in points]
        means = [v[0] for _, v in points]
        errs = [v[1] for _, v in points]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=25 if len(groups) > 3 else 0, ha="right" if len(groups) > 3 else "center",
                       fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if names:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
