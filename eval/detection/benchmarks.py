"""The benchmarks of the detection runner, one small spec each: what VOC and COCO do differently. No detectron2.

A spec holds a benchmark's shipped configs, its dataset layout check and registration at the user's root, the
evaluator a trial builds, the metrics it keeps (and how they are stored and printed), and the published rows to
compare with. Everything else (trials, seeds, resume, memory pre-flight, scheduling, summaries) is the runner's
and the same for all. Keypoints, LVIS or Cityscapes would each be one more spec: a layout check, a registration,
an evaluator and its tasks (e.g. "keypoints") with their metric names.

How a trial's metrics are stored (`trial_<k>/metrics.json`) and summarised (`summary.json`):
  voc   flat, as before COCO existed: {"AP": .., "AP50": .., "AP75": .., "seed": .., ...}; summary rows and
        "mean"/"std" hold the same three keys at their top level.
  coco  one dict per evaluator task: {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {same},
        "seed": .., ...}; summary rows and "mean"/"std" hold {"bbox": {...}, "segm": {...}}.
Values are percentages as detectron2's evaluators report them; a value that is not finite (COCO gives NaN when
no object of a size exists) is stored as null. summary.json and run.json name the benchmark ("benchmark").
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moco_transfer.detection_configs import COCO_C4_1X, COCO_C4_2X, COCO_FPN_1X, COCO_FPN_2X, VOC_24K
from moco_transfer.fileio import sha256_file

from . import layouts

Values = dict[str, dict[str, float | None]]  # task ("bbox", "segm") -> metric -> value


@dataclass(frozen=True)
class Reference:
    """A published result of the protocol, to read a run against."""

    label: str  # what was pretrained, e.g. "MoCo IN-1M"
    config: str  # the --config it corresponds to
    values: Mapping[str, Mapping[str, float]]  # task -> metric -> value
    source: str


@dataclass(frozen=True)
class Layout:
    """What a dataset check found: images per dataset, and the number of categories when the files say it.

    `identity`: per dataset, the sha256 of the file that says which images it holds (VOC's split file, COCO's
    annotation file). It tells a subset from the full set wherever the root lies, so run.json can pin the data
    and still let a resume read the same files from a copy elsewhere (a job's node-local scratch disk).
    """

    counts: dict[str, int]
    classes: int | None = None
    identity: dict[str, str] = field(default_factory=dict)

    def datasets(self) -> dict[str, dict[str, Any]]:
        """What run.json records of the data: images and defining-file sha256 per dataset."""
        return {name: {"images": n, "sha256": self.identity.get(name)} for name, n in sorted(self.counts.items())}


@dataclass(frozen=True)
class Benchmark:
    name: str  # "voc", "coco": the command, the runs/<name>/ folder, the "benchmark" field of the records
    title: str  # the summary's heading
    root_option: str  # the command-line option of the dataset root
    configs: Mapping[str, str]  # --config choices -> shipped file (a shipped file name or a YAML path also works)
    default_config: str
    default_trials: int
    tasks: tuple[str, ...]  # sections of the evaluator's result that are kept
    metric_keys: tuple[str, ...]  # kept per task, in the order of the summary's columns
    line_keys: tuple[str, ...]  # shown per task in a trial's line, in the order the paper's tables use
    flat: bool  # one task, its metrics at the top level of metrics.json and the summary (VOC's layout)
    builtin: Mapping[str, Any]  # detectron2's dataset names that this benchmark re-registers at the user's root
    check_layout: Callable[[Path, Sequence[str]], Layout]
    register: Callable[[str | os.PathLike, Sequence[str]], list[str]]
    evaluator: Callable[[str, str | None], Any]  # (registered dataset name, output folder) -> detectron2 evaluator
    references: tuple[Reference, ...] = ()
    task_labels: Mapping[str, str] = field(default_factory=lambda: {"bbox": "box", "segm": "mask"})

    # --- metrics records --------------------------------------------------------------------------------

    def record(self, results: Mapping[str, Any]) -> dict[str, Any]:
        """The metrics.json part of an evaluator's result; ValueError naming what is missing."""
        values: Values = {}
        for task in self.tasks:
            got = results.get(task)
            missing = [k for k in self.metric_keys if not isinstance(got, Mapping) or k not in got]
            if missing:
                raise ValueError(f"evaluation result lacks {task} {missing}; got {sorted(results)}"
                                 + (f" / {sorted(got)}" if isinstance(got, Mapping) else ""))
            values[task] = {k: _finite(got[k]) for k in self.metric_keys}
        return self.pack(values)

    def pack(self, values: Values) -> dict[str, Any]:
        """Per-task values in this benchmark's stored layout (flat for VOC, nested per task for COCO)."""
        return dict(values[self.tasks[0]]) if self.flat else {t: dict(values[t]) for t in self.tasks}

    def values(self, record: Mapping[str, Any]) -> Values | None:
        """Per-task values of a stored record (metrics.json, a summary row, mean or std); None if incomplete."""
        out: Values = {}
        for task in self.tasks:
            src = record if self.flat else record.get(task)
            if not isinstance(src, Mapping) or any(k not in src for k in self.metric_keys):
                return None
            out[task] = {k: src[k] for k in self.metric_keys}
        return out

    def format(self, record: Mapping[str, Any]) -> str:
        """The metrics of a trial line (finished now, or earlier and skipped): one formatting for both."""
        values = self.values(record) or {t: {} for t in self.tasks}
        parts = []
        for task in self.tasks:
            shown = " ".join(f"{k} {_fmt(values[task].get(k))}" for k in self.line_keys)
            parts.append(shown if self.flat else f"{self.task_labels.get(task, task)} {shown}")
        return " | ".join(parts)

    def columns(self) -> list[tuple[str, str, str]]:
        """(task, metric, header) of every summary column."""
        return [(t, k, k if self.flat else f"{self.task_labels.get(t, t)} {k}")
                for t in self.tasks for k in self.metric_keys]

    def dataset_name(self, name: str) -> str:
        """A config's dataset name as registered at the user's root (`layouts.our_name`)."""
        return layouts.our_name(name, self.builtin)

    def config_file(self, config: str) -> str:
        """A --config choice as the shipped file it names (anything else passes through: a file or a path)."""
        return self.configs.get(config, config)


def _finite(x: Any) -> float | None:
    """A value to store: a float, or None for a missing or non-finite one (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _identity(files: Mapping[str, Path], counts: Mapping[str, int]) -> dict[str, str]:
    """sha256 of each checked dataset's defining file (`Layout.identity`)."""
    return {name: sha256_file(path) for name, path in files.items() if name in counts}


# --- VOC ------------------------------------------------------------------------------------------------------


def _voc_layout(root: Path, names: Sequence[str]) -> Layout:
    counts = layouts.check_voc_root(root, names)
    return Layout(counts, identity=_identity(layouts.voc_defining_files(root, names), counts))


def _voc_evaluator(dataset_name: str, output_folder: str | None) -> Any:
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    return PascalVOCDetectionEvaluator(dataset_name)


_VOC_SOURCE = "MoCo v1 paper (supervised, v1) and MoCo v2 tech report (v2); means of 5 trials"
VOC = Benchmark(
    name="voc", title="VOC07 test detection", root_option="--voc-root",
    configs={"c4-24k": VOC_24K}, default_config=VOC_24K, default_trials=5,
    tasks=("bbox",), metric_keys=("AP", "AP50", "AP75"), line_keys=("AP50", "AP", "AP75"), flat=True,
    builtin=layouts.VOC_SPLITS, check_layout=_voc_layout, register=layouts.register_voc, evaluator=_voc_evaluator,
    references=tuple(Reference(label, VOC_24K, {"bbox": {"AP50": a50, "AP": ap, "AP75": a75}}, _VOC_SOURCE)
                     for label, a50, ap, a75 in (("supervised IN-1M", 81.3, 53.5, 58.8),
                                                 ("MoCo v1, 200 ep", 81.5, 55.9, 62.6),
                                                 ("MoCo v2, 200 ep", 82.4, 57.0, 63.6),
                                                 ("MoCo v2, 800 ep", 82.5, 57.4, 64.0))),
)


# --- COCO -----------------------------------------------------------------------------------------------------


def _coco_layout(root: Path, names: Sequence[str]) -> Layout:
    counts, classes = layouts.check_coco_root(root, names)
    return Layout(counts, classes, _identity(layouts.coco_defining_files(root, names), counts))


def _coco_evaluator(dataset_name: str, output_folder: str | None) -> Any:
    import importlib.util

    from detectron2.evaluation import COCOEvaluator

    # detectron2's fast COCOeval lives in its compiled ops; its Python sources alone (the GPU check's copy) lack them
    fast = importlib.util.find_spec("detectron2._C") is not None
    return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), distributed=True, output_dir=output_folder,
                         use_fast_impl=fast)


def _coco_row(label: str, config: str, box: tuple[float, ...], mask: tuple[float, ...], source: str) -> Reference:
    keys = ("AP", "AP50", "AP75")
    values = {"bbox": dict(zip(keys, box, strict=True)), "segm": dict(zip(keys, mask, strict=True))}
    return Reference(label, config, values, source)


_TABLE5 = "MoCo v1 paper, Table 5 (single runs; read from secondary sources)"
COCO = Benchmark(
    name="coco", title="COCO val2017 detection and instance segmentation (Mask R-CNN)", root_option="--coco-root",
    configs={"c4-1x": COCO_C4_1X, "c4-2x": COCO_C4_2X, "fpn-1x": COCO_FPN_1X, "fpn-2x": COCO_FPN_2X},
    default_config="fpn-1x", default_trials=1,
    tasks=("bbox", "segm"), metric_keys=("AP", "AP50", "AP75", "APs", "APm", "APl"), line_keys=("AP", "AP50", "AP75"),
    flat=False, builtin=layouts.COCO_SPLITS, check_layout=_coco_layout, register=layouts.register_coco,
    evaluator=_coco_evaluator,
    references=(
        _coco_row("supervised IN-1M", "fpn-2x", (40.6, 61.3, 44.4), (36.8, 58.1, 39.5), _TABLE5),
        _coco_row("MoCo IN-1M", "fpn-2x", (40.8, 61.6, 44.7), (36.9, 58.4, 39.7), _TABLE5),
        _coco_row("supervised IN-1M", "c4-2x", (40.0, 59.9, 43.1), (34.7, 56.5, 36.9), _TABLE5),
        _coco_row("MoCo IN-1M", "c4-2x", (40.7, 60.5, 44.1), (35.4, 57.3, 37.6), _TABLE5),
        Reference("MoCo IN-1M", "fpn-1x", {"segm": {"AP": 35.1}},
                  "MoCo v1 paper, Table 5; reproduced 34.8 in moco issue 39"),
    ),
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (VOC, COCO)}


def get_benchmark(name: str) -> Benchmark:
    """The spec by name; KeyError lists the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}") from None
