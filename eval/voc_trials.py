"""Bookkeeping of repeated VOC fine-tuning trials: folders, seeds, states, metrics, the summary. No detectron2.

Layout of an output folder:
  run.json              what the trials were run with (checkpoint and config fingerprints), checked on re-runs
  trial_<k>/            detectron2's OUTPUT_DIR of trial k (seed = base seed + k); `last_checkpoint` while running
  trial_<k>/metrics.json  written once the trial's evaluation is done: the trial is finished
  summary.json, summary.md  per-trial AP/AP50/AP75 with mean and sample std, rewritten after every trial
"""

from __future__ import annotations

import json
import math
import os
import statistics
from enum import Enum
from pathlib import Path
from typing import Any

from moco_transfer.fileio import atomic_open

METRICS_FILE = "metrics.json"
RUN_FILE = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
METRIC_KEYS = ("AP", "AP50", "AP75")


class TrialState(str, Enum):
    NEW = "new"
    INTERRUPTED = "interrupted"  # has a detectron2 checkpoint but no metrics: resume it
    FINISHED = "finished"


class RunMismatch(ValueError):
    """The output folder holds trials of a different checkpoint or configuration."""


def trial_dir(out_dir: str | os.PathLike, k: int) -> Path:
    return Path(out_dir) / f"trial_{k}"


def trial_seed(base_seed: int, k: int) -> int:
    """Distinct, reproducible seed per trial."""
    return base_seed + k


def trial_state(folder: str | os.PathLike) -> TrialState:
    folder = Path(folder)
    if read_metrics(folder) is not None:
        return TrialState.FINISHED
    if (folder / "last_checkpoint").is_file():
        return TrialState.INTERRUPTED
    return TrialState.NEW


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """JSON via a temporary file and rename, so a crash never leaves half a metrics or summary file."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")


def _write_text_atomic(text: str, path: Path) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def write_metrics(folder: str | os.PathLike, bbox: dict[str, float], seed: int, **extra: Any) -> dict[str, Any]:
    """Record a finished trial: AP, AP50, AP75 (percent, as PascalVOCDetectionEvaluator reports them)."""
    missing = [k for k in METRIC_KEYS if k not in bbox]
    if missing:
        raise ValueError(f"evaluation result lacks {missing}; got {sorted(bbox)}")
    record = {k: _finite(bbox[k]) for k in METRIC_KEYS} | {"seed": seed} | extra
    write_json_atomic(record, Path(folder) / METRICS_FILE)
    return record


def read_metrics(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The metrics of a finished trial, or None (absent, or unreadable: then the trial is redone)."""
    path = Path(folder) / METRICS_FILE
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or any(k not in record for k in METRIC_KEYS):
        return None
    return record


def summarize(out_dir: str | os.PathLike, trials: int, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Collect finished trials 0..trials-1, compute mean and sample std, write summary.json and summary.md."""
    out_dir = Path(out_dir)
    rows = []
    for k in range(trials):
        m = read_metrics(trial_dir(out_dir, k))
        if m is not None:
            rows.append({"trial": k, "seed": m.get("seed"), **{key: m[key] for key in METRIC_KEYS}})
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [r[key] for r in rows if r[key] is not None]
        mean[key] = statistics.fmean(values) if values else None
        std[key] = statistics.stdev(values) if len(values) > 1 else None
    summary = {"trials_requested": trials, "trials_finished": len(rows), "trials": rows, "mean": mean, "std": std,
               **(info or {})}
    write_json_atomic(summary, out_dir / SUMMARY_JSON)
    _write_text_atomic(summary_markdown(summary), out_dir / SUMMARY_MD)
    return summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"VOC07 test detection, {summary['trials_finished']} of {summary['trials_requested']} trials finished",
             "", "| trial | seed | AP | AP50 | AP75 |", "|---|---|---|---|---|"]
    for r in summary["trials"]:
        lines.append(f"| {r['trial']} | {r['seed']} | " + " | ".join(_fmt(r[k]) for k in METRIC_KEYS) + " |")
    lines.append("| mean | | " + " | ".join(_fmt(summary["mean"][k]) for k in METRIC_KEYS) + " |")
    lines.append("| std | | " + " | ".join(_fmt(summary["std"][k]) for k in METRIC_KEYS) + " |")
    lines.append("")
    lines.append("std is the sample standard deviation over finished trials.")
    return "\n".join(lines) + "\n"


def check_run(out_dir: str | os.PathLike, fingerprint: dict[str, str], record: bool = True) -> bool:
    """Verify `fingerprint` matches what the folder's trials were run with; True if the folder had one.

    With `record`, a folder without run.json gets one. Re-running with more trials is fine; a different
    checkpoint or configuration would mix incomparable trials in one summary, so it is an error naming what
    differs.
    """
    path = Path(out_dir) / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        differ = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if differ:
            raise RunMismatch(f"output folder {out_dir} holds trials run with a different {', '.join(differ)} "
                              f"(see {path}); choose another output folder or remove it")
        return True
    if record:
        write_json_atomic(fingerprint, path)
    return False
