"""`moco report`: the results found under some folders, as one table in the MoCo v2 tech report's layout.

Rows are checkpoints (the same sha256, or else the same resolved path, is one row; every evaluation of it
lands there) with the recipe switches of their pretraining config. With `group_by="recipe"` the checkpoints of
one recipe (its seeds) become one row: mean ± std of their per-checkpoint values, n = checkpoints.

Columns are linear top-1, kNN top-1, VOC AP50/AP/AP75 and, when some row has them, COCO box and mask AP/AP50/AP75.
A column holds ONE protocol: a result measured another way (linear mode, epochs, lr or data; kNN source, k, T or
data; detection training target, by its config hash whatever the config file was called) gets a column of its
own whose header names what differs, and the full protocol of every column is listed under the table. A cell
with no result is "–"; nothing is filled in. Results belong to the checkpoint whose sha256 they recorded: those
of a checkpoint since replaced at its path are a stale row of their own, never credited to the new file.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moco_transfer.checkpoint import checkpoint_name, find_latest
from moco_transfer.fileio import atomic_open, sha256_file
from moco_transfer.markdown import escape, table

from .detection.benchmarks import COCO, VOC, get_benchmark
from .detection.prepare import EXECUTION_KEYS
from .detection.trials import RUN_FILE, SUMMARY_JSON, SUPERSEDED, read_metrics
from .plots import save_bars

# Detection columns: (benchmark, evaluator task, metric) -> family, each benchmark's trial-line metrics in its
# paper's order ("VOC AP50", ..., "COCO box AP", ..., "COCO mask AP75").
DETECTION_FAMILY = {(bm.name, task, key): f"{bm.name.upper()} {'' if bm.flat else bm.task_labels[task] + ' '}{key}"
                    for bm in (VOC, COCO) for task in bm.tasks for key in bm.line_keys}
PROBE_FAMILY = "online probe top-1"
FAMILIES = ("linear top-1", "kNN top-1", PROBE_FAMILY, *DETECTION_FAMILY.values())
# Families shown only when some row has a result: COCO is optional (a day of GPU time per trial), and six empty
# columns on every table would hide the tech report's own layout (linear, kNN, VOC); the online probe exists only
# for runs on labelled data.
OPTIONAL_FAMILIES = frozenset(f for f in FAMILIES if f.startswith("COCO") or f == PROBE_FAMILY)
# Header -> PretrainConfig field, in the tech report's order.
SWITCHES = (("MLP", "mlp"), ("aug+", "aug_plus"), ("cos", "cos"), ("T", "moco_t"), ("epochs", "epochs"),
            ("batch", "batch_size"))
# Config fields that say how a run was executed or monitored, not what was trained: ignored when pooling seeds.
# Any other field (including ones added later) separates recipes, so pooling errs on the side of not merging.
RUN_ONLY = frozenset({"seed", "output", "workers", "device", "amp", "channels_last", "knn_every", "knn_data",
                      "knn_k", "knn_t", "keep_every", "print_baseline", "data_pipeline", "log_every",
                      "online_probe", "tensorboard", "wandb"})
GROUP_BY = ("checkpoint", "recipe")
DEFAULT_KNN_K = 200
DASH = "–"
RESULT_KINDS = ("pretraining run folders (log.jsonl or pretrain.json), linear.json (moco eval linear), "
                "knn.json (moco eval knn), VOC and COCO run folders (moco eval voc|coco: summary.json / run.json + "
                "trial_<k>/metrics.json)")
TRIAL_DIR = re.compile(r"trial_(\d+)")
SOURCE_TEXT = {
    "linear top-1": "`moco eval linear`, top-1 (%) of the final epoch",
    "kNN top-1/eval knn": "`moco eval knn`, weighted kNN top-1 (%)",
    "kNN top-1/monitor": "the pretraining run's kNN monitor, weighted kNN top-1 (%) of its final encoder",
    "VOC": "`moco eval voc`, VOC07 test box AP (%) after fine-tuning",
    "COCO": "`moco eval coco`, COCO val2017 box or mask AP (%) of Mask R-CNN after fine-tuning",
}


class ReportError(ValueError):
    """Nothing to report, or a path that cannot be read; the message names the paths."""


@dataclass(frozen=True)
class Protocol:
    """What a column measures: a metric family plus every setting that changes its numbers."""

    family: str
    attrs: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in self.attrs)


@dataclass
class Measurement:
    protocol: Protocol
    values: list[float]
    requested: int | None = None  # VOC: trials asked for; `values` holds the finished ones


@dataclass
class Found:
    """What one result file or run folder says about one checkpoint (or one random-init baseline)."""

    kind: str  # pretrain | linear | knn | voc | random init
    source: Path
    measurements: list[Measurement]
    checkpoint: Path | None = None  # absolute path of the checkpoint, when the source records one
    recorded_path: str | None = None  # the path as recorded, when it is not absolute (label only)
    sha256: str | None = None
    recipe: dict[str, Any] | None = None
    trained_epochs: int | None = None
    seed: int | None = None
    baseline: tuple[Any, ...] | None = None  # random init: (arch, small_images, image_size)


@dataclass(frozen=True)
class Pooling:
    """Several evaluations of one checkpoint under one protocol, merged into one cell: the table lists them."""

    checkpoint: str  # the checkpoint's row label
    parts: tuple[tuple[Path, int], ...]  # (result source, values it gave), one per evaluation


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    requested: int | None = None
    pooled: list[Pooling] = field(default_factory=list)  # empty: the values come from one evaluation each


@dataclass
class Row:
    label: str
    recipe: dict[str, Any] | None
    trained_epochs: int | None
    cells: dict[Protocol, Cell]
    sources: list[Path]
    seeds: list[int]
    baseline: tuple[Any, ...] | None = None  # random init: (arch, small_images, image_size)
    differs: list[tuple[str, str]] = field(default_factory=list)  # recipe fields that set it apart from look-alikes
    stale: str | None = None  # results of a checkpoint replaced at its path since: the sha256 they were computed on


@dataclass
class Report:
    rows: list[Row]
    columns: list[Protocol | str]  # a family name stands for a family without any result
    headers: list[str]  # metric column headers, parallel to `columns`
    markdown: str
    skipped: list[str]
    sources: list[Path]
    group_by: str


class _Unusable(ValueError):
    """A result file that cannot be used; reported in the table's notes, never silently dropped."""


# --- reading result files -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Unusable(f"not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise _Unusable("expected a JSON object")
    return data


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _Unusable(f"{path.name} is not readable YAML ({exc})") from None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt_setting(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _absolute(recorded: Any) -> tuple[Path | None, str | None]:
    """A recorded checkpoint path: usable for identity only when absolute (a relative one depends on a cwd)."""
    if not isinstance(recorded, str) or not recorded:
        return None, None
    p = Path(recorded)
    return (p, None) if p.is_absolute() else (None, recorded)


def _monitor_protocol(summary: dict[str, Any], cfg: dict[str, Any]) -> Protocol:
    data = summary.get("knn_data") or cfg.get("knn_data") or cfg.get("data")
    if data is None:
        data = f"embedded ({cfg['preset']} preset, {cfg.get('image_size', '?')}px)" if cfg.get("preset") else "?"
    return Protocol("kNN top-1", (("source", "monitor"), ("k", _fmt_setting(summary.get("knn_k", cfg.get("knn_k")))),
                                  ("T", _fmt_setting(summary.get("knn_t", cfg.get("knn_t")))), ("data", str(data))))


def read_pretrain_run(folder: Path, hashes: dict[Path, str]) -> list[Found]:
    """The run's final checkpoint with its config and final kNN monitor value, plus its random-init baseline.

    pretrain.json (the run summary) is optional: without it the monitor value is log.jsonl's last line, and only
    when the monitor ran at that last epoch (an earlier epoch's value would belong to another checkpoint).
    """
    cfg = _read_config(folder / "config.yaml")
    summary = _read_json(folder / "pretrain.json") if (folder / "pretrain.json").is_file() else {}
    history: list[dict[str, Any]] = []
    if (folder / "log.jsonl").is_file():
        try:
            log = (folder / "log.jsonl").read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise _Unusable(f"log.jsonl is not readable text ({type(exc).__name__}: {exc})") from None
        for n, line in enumerate(log.splitlines(), 1):
            if line.strip():
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError:
                    raise _Unusable(f"log.jsonl line {n} is not JSON") from None
    last = summary.get("last") if isinstance(summary.get("last"), dict) else (history[-1] if history else None)
    trained = last.get("epoch") if last else None
    if isinstance(trained, int) and trained > 0:
        ckpt = folder / checkpoint_name(trained - 1)
        ckpt = ckpt if ckpt.is_file() else None
    else:
        trained = None
        ckpt = find_latest(folder)
    cfg_dict = cfg or {}
    protocol = _monitor_protocol(summary, cfg_dict)
    knn = _number(summary.get("knn_top1"))
    if knn is None and last is not None:
        knn = _number(last.get("knn_top1"))
    measurements = [Measurement(protocol, [knn])] if knn is not None else []
    probe = _number(last.get("online_probe_top1")) if last is not None else None
    if probe is not None:  # the last epoch's training-stream top-1 of the probe trained beside MoCo
        measurements.append(Measurement(Protocol(PROBE_FAMILY, (("source", "training stream"),)), [probe]))
    found = [Found("pretrain", folder, measurements, checkpoint=ckpt.resolve() if ckpt else None,
                   sha256=_sha(ckpt, hashes) if ckpt else None, recipe=cfg, trained_epochs=trained,
                   seed=cfg_dict.get("seed"))]
    random_init = _number(summary.get("knn_top1_random_init"))
    if random_init is not None:
        baseline = (cfg_dict.get("arch", "?"), bool(cfg_dict.get("small_images")), cfg_dict.get("image_size", "?"))
        found.append(Found("random init", folder, [Measurement(protocol, [random_init])], seed=cfg_dict.get("seed"),
                           baseline=baseline))
    return found


def read_linear(path: Path) -> list[Found]:
    d = _read_json(path)
    top1 = _number((d.get("final") or {}).get("top1")) if isinstance(d.get("final"), dict) else None
    if top1 is None or not isinstance(d.get("mode"), str):
        raise _Unusable("no 'mode' and final top-1: not a `moco eval linear` result")
    hp = d.get("hyperparameters") or {}
    attrs: list[tuple[str, str]] = [("mode", d["mode"])]
    if d["mode"] != "lbfgs":
        attrs += [("epochs", _fmt_setting(hp.get("epochs"))), ("lr", _fmt_setting(d.get("lr")))]
    attrs.append(("data", _fmt_setting(d.get("data"))))
    ckpt, recorded = _absolute(d.get("checkpoint"))
    return [Found("linear", path, [Measurement(Protocol("linear top-1", tuple(attrs)), [top1])], checkpoint=ckpt,
                  recorded_path=recorded, sha256=d.get("checkpoint_sha256"), trained_epochs=d.get("epoch"))]


def read_knn(path: Path, knn_ks: Sequence[int]) -> list[Found]:
    """The top-1 of the chosen k values; a file holding none of them contributes all of its own."""
    d = _read_json(path)
    votes = d.get("knn")
    if not isinstance(votes, dict) or not votes:
        raise _Unusable("no 'knn' results: not a `moco eval knn` result")
    try:
        available = {int(k): _number(v.get("top1")) for k, v in votes.items()}
    except (ValueError, AttributeError):
        raise _Unusable("'knn' is not a mapping of k to {top1, top5}") from None
    chosen = [k for k in knn_ks if k in available] or sorted(available)
    temperature = _fmt_setting((d.get("hyperparameters") or {}).get("temperature"))
    measurements = [Measurement(Protocol("kNN top-1", (("source", "eval knn"), ("k", str(k)), ("T", temperature),
                                                       ("data", _fmt_setting(d.get("data"))))), [available[k]])
                    for k in chosen if available[k] is not None]
    ckpt, recorded = _absolute(d.get("checkpoint"))
    return [Found("knn", path, measurements, checkpoint=ckpt, recorded_path=recorded,
                  sha256=d.get("checkpoint_sha256"), trained_epochs=d.get("epoch"))]


def config_name(bm: Any, config: str) -> str:
    """A detection config by one name however it was given: the --config choice of a shipped file (`c4-24k` for
    `voc_R_50_C4_24k_moco.yaml`), else the file's name."""
    name = Path(config).name
    return next((choice for choice, file in bm.configs.items() if config == choice or name == file), name)


def target_opts(opts: Sequence[Any]) -> str:
    """The --opts pairs that change what a trial optimises; execution settings (workers, checkpoint period, ...)
    are left out, as run.json's config hash leaves them out."""
    items = list(map(str, opts))
    pairs = [f"{k} {v}" for k, v in zip(items[::2], items[1::2], strict=False) if k not in EXECUTION_KEYS]
    return " ".join(pairs) or "none"


def merge_detection_protocols(found: Sequence[Found]) -> None:
    """One detection protocol, one column: results with the same training-target hash (run.json's config_sha256)
    get the same Protocol, whatever the config was called (`c4-24k`, the shipped file's name or a copy of it) or
    whichever no-op --opts were given; the column names every spelling seen. Results without a hash keep theirs."""
    spellings: dict[tuple[str, str], dict[str, dict[str, None]]] = {}
    for f in found:
        for m in f.measurements:
            attrs = dict(m.protocol.attrs)
            if "config sha256" in attrs and attrs["config sha256"] != "?":
                seen = spellings.setdefault((m.protocol.family, attrs["config sha256"]), {"config": {}, "opts": {}})
                seen["config"][attrs["config"]] = None
                seen["opts"][attrs["opts"]] = None
    for f in found:
        for m in f.measurements:
            attrs = dict(m.protocol.attrs)
            seen = spellings.get((m.protocol.family, attrs.get("config sha256", "?")))
            if seen is not None:
                merged = (("config", " / ".join(sorted(seen["config"]))), ("opts", " / ".join(sorted(seen["opts"]))),
                          ("config sha256", attrs["config sha256"]))
                m.protocol = Protocol(m.protocol.family, merged)


def read_detection_run(folder: Path) -> list[Found]:
    """Finished trials of `moco eval voc` or `moco eval coco` from trial_<k>/metrics.json (summary.json's list when
    the trial folders are gone). The benchmark is the one summary.json or run.json names (VOC before they did)."""
    summary = _read_json(folder / SUMMARY_JSON) if (folder / SUMMARY_JSON).is_file() else {}
    run = _read_json(folder / RUN_FILE) if (folder / RUN_FILE).is_file() else {}
    try:
        bm = get_benchmark(str(summary.get("benchmark") or run.get("benchmark") or VOC.name))
    except KeyError as exc:
        raise _Unusable(str(exc)) from None
    requested = summary.get("trials_requested")
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir()
                      if p.is_dir() and (m := TRIAL_DIR.fullmatch(p.name)))
    if isinstance(requested, int):
        numbered = [(k, p) for k, p in numbered if k < requested]
    trials = [v for _, p in numbered if (m := read_metrics(p, bm)) is not None and (v := bm.values(m))]
    if not numbered:
        trials = [v for t in summary.get("trials") or [] if isinstance(t, dict) and (v := bm.values(t))]
    if not trials:
        raise _Unusable(f"a {bm.name.upper()} run folder without a finished trial")
    attrs = (("config", config_name(bm, str(summary.get("config") or "?"))),
             ("opts", target_opts(summary.get("opts") or [])),
             ("config sha256", str(run.get("config_sha256") or "?")[:12]))
    measurements = []
    for (name, task, key), family in DETECTION_FAMILY.items():
        if name != bm.name:
            continue
        values = [v for t in trials if (v := _number(t[task].get(key))) is not None]
        measurements.append(Measurement(Protocol(family, attrs), values,
                                        requested if isinstance(requested, int) else None))
    ckpt, recorded = _absolute(summary.get("checkpoint"))
    return [Found(bm.name, folder, measurements, checkpoint=ckpt, recorded_path=recorded,
                  sha256=run.get("checkpoint_sha256") or summary.get("checkpoint_sha256"))]


def _sha(path: Path, hashes: dict[Path, str]) -> str:
    key = path.resolve()
    if key not in hashes:
        hashes[key] = sha256_file(key)
    return hashes[key]


def _folder_kinds(names: set[str], subdirs: Iterable[str]) -> list[str]:
    kinds = []
    if names & {"log.jsonl", "pretrain.json"}:
        kinds.append("pretrain")
    if "linear.json" in names:
        kinds.append("linear")
    if "knn.json" in names:
        kinds.append("knn")
    if SUMMARY_JSON in names or (RUN_FILE in names and any(TRIAL_DIR.fullmatch(d) for d in subdirs)):
        kinds.append("detection")
    return kinds


FILE_KINDS = {"linear.json": "linear", "knn.json": "knn", SUMMARY_JSON: "detection", RUN_FILE: "detection",
              "pretrain.json": "pretrain", "log.jsonl": "pretrain"}


def collect(paths: Sequence[str | os.PathLike], knn_ks: Sequence[int] = (DEFAULT_KNN_K,)
            ) -> tuple[list[Found], list[str], list[Path]]:
    """Walk `paths` (folders recursively, or single result files); returns results, skipped files, sources."""
    if not paths:
        raise ReportError(f"no PATH given: name folders that hold {RESULT_KINDS}")
    found: list[Found] = []
    skipped: list[str] = []
    sources: list[Path] = []
    done: set[tuple[Path, str]] = set()
    hashes: dict[Path, str] = {}

    def read(folder: Path, kind: str) -> None:
        key = (folder.resolve(), kind)
        if key in done:
            return
        done.add(key)
        where = {"linear": folder / "linear.json", "knn": folder / "knn.json"}.get(kind, folder)
        try:
            if kind == "pretrain":
                found.extend(read_pretrain_run(folder, hashes))
            elif kind == "linear":
                found.extend(read_linear(where))
            elif kind == "knn":
                found.extend(read_knn(where, knn_ks))
            else:
                found.extend(read_detection_run(folder))
            sources.append(where)
        except _Unusable as exc:
            skipped.append(f"{where}: {exc}")

    for given in paths:
        path = Path(given)
        if not path.exists():
            raise ReportError(f"{given}: no such file or folder")
        if path.is_file():
            if path.name not in FILE_KINDS:
                raise ReportError(f"{given}: not a result file; expected a folder or one of {', '.join(FILE_KINDS)}")
            read(path.parent, FILE_KINDS[path.name])
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            kinds = _folder_kinds(set(filenames), dirnames)
            if "detection" in kinds:  # its trial folders hold detectron2 files, not results of their own
                if SUPERSEDED in dirnames:
                    skipped.append(f"{Path(dirpath) / SUPERSEDED}: superseded VOC trials, not reported "
                                   "(name the folder itself to see them)")
                dirnames[:] = [d for d in dirnames if not TRIAL_DIR.fullmatch(d) and d != SUPERSEDED]
            for kind in kinds:
                read(Path(dirpath), kind)
    if not found:
        extra = f" ({len(skipped)} unusable: {'; '.join(skipped)})" if skipped else ""
        raise ReportError(f"no results found in {', '.join(map(str, paths))}{extra}; expected {RESULT_KINDS}")
    return found, skipped, sources


# --- rows ---------------------------------------------------------------------------------------------------


def _display_path(path: Path) -> str:
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _checkpoint_recipe(path: Path, sha: str | None, hashes: dict[Path, str]) -> tuple[dict | None, int | None]:
    """The pretraining config of a checkpoint: its run folder's config.yaml, else the checkpoint's own entry.

    Neither when the file at `path` is no longer the one evaluated (`sha`): a run started again in its folder
    rewrote config.yaml along with the checkpoint, so the folder describes the new checkpoint, not this one.
    """
    if sha is not None and path.is_file() and _sha(path, hashes) != sha:
        return None, None  # replaced since it was evaluated
    folder = path.parent
    is_run = (folder / "log.jsonl").is_file() or (folder / "pretrain.json").is_file()
    if is_run and (folder / "config.yaml").is_file():
        try:
            cfg = _read_config(folder / "config.yaml")
        except _Unusable:
            cfg = None
        if cfg is not None:
            return cfg, None
    if not path.is_file():
        return None, None  # gone
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None, None
    if not isinstance(ckpt, dict):
        return None, None
    cfg = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    epoch = ckpt.get("epoch")
    return cfg, epoch if isinstance(epoch, int) else None


def _subjects(found: Sequence[Found]) -> dict[tuple[Any, ...], list[Found]]:
    """One group per checkpoint: the same sha256, else the same absolute path; random inits per (arch, seed).

    A result that recorded only a path joins the sha256 of the file a pretraining run holds there now (else that
    of any result of the path); results that recorded a sha256 stay with it, even when the file has changed since.
    """
    sha_of_path = {str(f.checkpoint): f.sha256 for f in found if f.checkpoint and f.sha256 and f.kind != "pretrain"}
    sha_of_path |= {str(f.checkpoint): f.sha256 for f in found if f.checkpoint and f.sha256 and f.kind == "pretrain"}
    groups: dict[tuple[Any, ...], list[Found]] = {}
    for f in found:
        if f.kind == "random init":
            key: tuple[Any, ...] = ("random init", *(f.baseline or ()), f.seed)
        elif f.sha256 or (f.checkpoint and str(f.checkpoint) in sha_of_path):
            key = ("sha", f.sha256 or sha_of_path[str(f.checkpoint)])
        elif f.checkpoint:
            key = ("path", str(f.checkpoint))
        else:
            key = ("source", str(f.source))
        groups.setdefault(key, []).append(f)
    return groups


def _baseline_name(baseline: tuple[Any, ...]) -> str:
    arch, small, size = baseline
    return f"random init ({arch}{', small stem' if small else ''}, {size}px"


def _checkpoint_row(key: tuple[Any, ...], members: list[Found], hashes: dict[Path, str]) -> Row:
    row = _checkpoint_row_cells(key, members, hashes)
    for protocol, cell in row.cells.items():  # two evaluations under one protocol: pooled, and the table says so
        parts = [(f.source, n) for f in members for m in f.measurements if m.protocol == protocol
                 if (n := len(m.values))]
        if len(parts) < 2 or (row.baseline is not None and len(cell.values) < 2):
            continue  # one evaluation, or one random network that several runs measured alike (counted once)
        cell.pooled = [Pooling(row.label, tuple(parts))]
    return row


def _checkpoint_row_cells(key: tuple[Any, ...], members: list[Found], hashes: dict[Path, str]) -> Row:
    cells: dict[Protocol, Cell] = {}
    for f in members:
        for m in f.measurements:
            cell = cells.setdefault(m.protocol, Cell())
            cell.values.extend(m.values)
            if m.requested is not None:
                cell.requested = (cell.requested or 0) + m.requested
    sources = [f.source for f in members]
    seeds = sorted({f.seed for f in members if isinstance(f.seed, int)})
    if key[0] == "random init":
        baseline = members[0].baseline or ("?", False, "?")
        label = f"{_baseline_name(baseline)}, seed {_fmt_setting(members[0].seed)})"
        for cell in cells.values():  # runs with one seed measure one network: a repeated value is one result
            cell.values = list(dict.fromkeys(cell.values))
        return Row(label, None, None, cells, sources, seeds, baseline=baseline)
    runs = [f for f in members if f.kind == "pretrain"]
    recipe = next((f.recipe for f in runs if f.recipe), None)
    trained = next((f.trained_epochs for f in members if isinstance(f.trained_epochs, int)), None)
    path = next((f.checkpoint for f in runs if f.checkpoint), None) or next(
        (f.checkpoint for f in members if f.checkpoint), None)
    stale = None
    if not runs and path is not None and key[0] == "sha" and path.is_file() and _sha(path, hashes) != key[1]:
        stale = key[1]  # evaluated on a checkpoint that a later run replaced at this path
    if recipe is None and path is not None:
        recipe, epoch = _checkpoint_recipe(path, key[1] if key[0] == "sha" else None, hashes)
        trained = trained if trained is not None else epoch
    if recipe is not None and not seeds and isinstance(recipe.get("seed"), int):
        seeds = [recipe["seed"]]
    if stale is not None:
        label = f"{_display_path(path)} (stale: sha256 {stale[:12]}, since replaced)"
    elif path is not None:
        label = _display_path(path)
    elif runs:
        label = f"{_display_path(runs[0].source)} (checkpoint file not found)"
    else:
        recorded = next((f.recorded_path for f in members if f.recorded_path), None)
        label = recorded or "?"
        if key[0] == "sha":
            label += f" (sha256 {key[1][:12]})"
    return Row(label, recipe, trained, cells, sources, seeds, stale=stale)


def _recipe_key(row: Row) -> tuple[Any, ...]:
    assert row.recipe is not None
    return (tuple(sorted((k, repr(v)) for k, v in row.recipe.items() if k not in RUN_ONLY)), row.trained_epochs)


def _group_rows(rows: list[Row]) -> list[Row]:
    """Pool checkpoints of one recipe (seeds): each cell becomes the list of per-checkpoint means."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for i, row in enumerate(rows):
        if row.baseline:
            key: tuple[Any, ...] = ("random init", row.baseline)
        elif row.recipe is not None:
            key = ("recipe", _recipe_key(row))
        else:
            key = ("alone", i)
        groups.setdefault(key, []).append(row)
    out = []
    for key, members in groups.items():
        if key[0] == "alone":
            out.append(members[0])
            continue
        cells: dict[Protocol, Cell] = {}
        for row in members:
            for protocol, cell in row.cells.items():
                if cell.values:
                    pooled = cells.setdefault(protocol, Cell(requested=len(members)))
                    pooled.values.append(statistics.fmean(cell.values))
                    pooled.pooled.extend(cell.pooled)
        seeds = sorted(s for row in members for s in row.seeds)
        seed_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else "seed ?"
        if key[0] == "random init":
            label = f"{_baseline_name(key[1])}, {seed_text})"
        else:
            label = f"{members[0].recipe.get('preset', '?')} ({seed_text})"
        out.append(Row(label, members[0].recipe, members[0].trained_epochs, cells,
                       [s for row in members for s in row.sources], seeds, members[0].baseline))
    return out


def _switch_values(row: Row) -> list[str]:
    if row.baseline:
        return ["n/a"] * len(SWITCHES)
    if row.recipe is None:
        return [DASH] * len(SWITCHES)
    out = []
    for _, name in SWITCHES:
        value = row.recipe.get(name)
        if value is None:
            out.append(DASH)
        elif isinstance(value, bool):
            out.append("✓" if value else "")
        elif name == "epochs" and row.trained_epochs is not None and row.trained_epochs != value:
            out.append(f"{row.trained_epochs}/{value}")
        else:
            out.append(_fmt_setting(value))
    return out


def _mark_differences(rows: list[Row]) -> None:
    """Rows that look alike in the switch columns get the recipe fields in which they differ in their label."""
    shown = {name for _, name in SWITCHES}
    buckets: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        if row.recipe is not None and not row.baseline:
            buckets.setdefault(tuple(_switch_values(row)), []).append(row)
    for bucket in buckets.values():
        if len(bucket) < 2:
            continue
        names = sorted({k for row in bucket for k in row.recipe or {}} - RUN_ONLY - shown)
        differ = [k for k in names if len({repr((row.recipe or {}).get(k)) for row in bucket}) > 1]
        for row in bucket:
            row.differs = [(k, _fmt_setting((row.recipe or {}).get(k))) for k in differ]
            if differ:
                row.label += " [" + ", ".join(f"{k} {v}" for k, v in row.differs) + "]"


def _sort_key(row: Row) -> tuple[Any, ...]:
    if row.baseline:
        return (0, (), row.label)
    if row.recipe is None:
        return (2, (), row.label)
    r = row.recipe
    switches = [bool(r.get("mlp")), bool(r.get("aug_plus")), bool(r.get("cos"))]
    numbers = tuple(float(v) if isinstance(v, (int, float)) else math.inf
                    for v in (r.get("moco_t"), r.get("epochs"), r.get("batch_size"), row.trained_epochs))
    return (1, (sum(switches), *(not s for s in switches), *numbers), row.label)


# --- the table ----------------------------------------------------------------------------------------------


def format_cell(cell: Cell | None, decimals: int = 1) -> str:
    """`57.0 ± 0.2 (n=5)`; one value without ±; `(n=3 of 5)` when trials are missing; no value: –.

    A cell that pools several evaluations of one checkpoint says so (`(n=2, pooled)`): the list under the table
    names them, so a reader does not take their spread for one evaluation's.
    """
    if cell is None or not cell.values:
        return DASH
    n, mean = len(cell.values), statistics.fmean(cell.values)
    text = f"{mean:.{decimals}f}"
    if n > 1:
        text += f" ± {statistics.stdev(cell.values):.{decimals}f}"
    counts = []
    if cell.requested is not None and cell.requested > n:
        counts.append(f"n={n} of {cell.requested}")
    elif n > 1:
        counts.append(f"n={n}")
    if cell.pooled:
        counts.append("pooled")
    return text + (f" ({', '.join(counts)})" if counts else "")


def _short_setting(name: str, value: str) -> str:
    if name in ("mode", "source", "config"):
        return value
    if name in ("k", "T"):
        return f"{name}={value}"
    if name == "epochs":
        return f"{value} ep"
    return f"{name} {value}"


def _data_label(value: str) -> str:
    if value.startswith("<") and value.endswith(">"):
        return value[1:-1]
    return Path(value).name or value


def _columns(rows: list[Row]) -> tuple[list[Protocol | str], list[str]]:
    """Protocols per family, in family order; headers name only the settings that differ within a family."""
    columns: list[Protocol | str] = []
    headers: list[str] = []
    present = {p for row in rows for p, c in row.cells.items() if c.values}
    for family in FAMILIES:
        protocols = sorted((p for p in present if p.family == family), key=lambda p: p.attrs)
        if not protocols:
            if family in OPTIONAL_FAMILIES:
                continue
            columns.append(family)
            headers.append(family)
            continue
        names = list(dict.fromkeys(n for p in protocols for n, _ in p.attrs))
        differ = [n for n in names if len({dict(p.attrs).get(n) for p in protocols}) > 1]
        data_values = {dict(p.attrs).get("data") for p in protocols} - {None}
        short_data = {v: _data_label(v) for v in data_values}
        if len(set(short_data.values())) < len(short_data):
            short_data = {v: v for v in data_values}
        for p in protocols:
            settings = dict(p.attrs)
            parts = [short_data[settings[n]] if n == "data" else _short_setting(n, settings[n])
                     for n in differ if n in settings]
            columns.append(p)
            headers.append(f"{family} ({', '.join(parts)})" if parts else family)
    return columns, headers


def _column_note(protocol: Protocol | str, header: str) -> str:
    if isinstance(protocol, str):
        return f"- **{header}**: no result found"
    if protocol.family.startswith(("VOC", "COCO")):
        what = SOURCE_TEXT[protocol.family.split()[0]]
    elif protocol.family == "kNN top-1":
        what = SOURCE_TEXT[f"kNN top-1/{dict(protocol.attrs).get('source')}"]
    else:
        what = SOURCE_TEXT["linear top-1"]
    settings = ", ".join(f"{n} {v}" for n, v in protocol.attrs if n != "source")
    return f"- **{header}**: {what}; {settings}"


def _source_folder(source: Path) -> str:
    return _display_path(source if source.is_dir() else source.parent)


def _pooling_notes(rows: list[Row], columns: list[Protocol | str], headers: list[str], group_by: str) -> list[str]:
    """One line per pooled cell: its row and column, and each evaluation in it with its folder and count."""
    lines = []
    for row in rows:
        for column, header in zip(columns, headers, strict=True):
            cell = row.cells.get(column) if isinstance(column, Protocol) else None
            for pooling in cell.pooled if cell else []:
                whose = "" if pooling.checkpoint == row.label else f"checkpoint {pooling.checkpoint}: "
                parts = ", ".join(f"{_source_folder(source)} (n={n})" for source, n in pooling.parts)
                lines.append(f"- {row.label}, **{header}**: {whose}{len(pooling.parts)} evaluations pooled: {parts}")
    if not lines:
        return []
    per_checkpoint = ("each pooled checkpoint's value is the mean over all its evaluations' values"
                      if group_by == "recipe" else "mean ± std and n are over all their values")
    return ["", "Pooled cells (one checkpoint evaluated more than once under one protocol; "
            f"{per_checkpoint}):", *(escape(line) for line in lines)]


def _stale_notes(rows: list[Row]) -> list[str]:
    """The rows of results whose checkpoint file has been replaced since: what they are and why they stand alone."""
    stale = [row for row in rows if row.stale]
    if not stale:
        return []
    lines = [f"- {row.label}: from {', '.join(_source_folder(s) for s in row.sources)}" for row in stale]
    return ["", "Stale rows (results computed on a checkpoint whose file has since been replaced at its path, e.g. "
            "by a new run in the same folder; matched by the sha256 the results recorded, so they are neither "
            "credited to the file there now nor given its recipe, and --group-by recipe never pools them):",
            *(escape(line) for line in lines)]


def render_markdown(rows: list[Row], columns: list[Protocol | str], headers: list[str], group_by: str,
                    paths: Sequence[str | os.PathLike], sources: list[Path], skipped: list[str],
                    decimals: int = 1) -> str:
    first = "recipe" if group_by == "recipe" else "checkpoint"
    lines = table([first, *(name for name, _ in SWITCHES), *headers], (
        [row.label, *_switch_values(row),
         *(format_cell(row.cells.get(c) if isinstance(c, Protocol) else None, decimals) for c in columns)]
        for row in rows))
    pooled = ("; with --group-by recipe, over the checkpoints of one recipe (their per-checkpoint means, "
              "n = checkpoints)") if group_by == "recipe" else ""
    lines += [
        "",
        f"✓ on, blank off, n/a not applicable; {DASH} no result (never filled in). Cells are the mean ± sample std "
        "of n values: the trials of one evaluation (VOC fine-tuning trials, repeated linear/kNN evaluations of one "
        f"checkpoint){pooled}; n=k of m: only k of m trials{' or checkpoints' if pooled else ''} have a result; "
        "pooled: the cell merges several evaluations of one checkpoint under one protocol (listed below). "
        "epochs a/b: a checkpoint taken after a of b scheduled epochs. random init: the same architecture with "
        "random weights, measured by the pretraining runs' kNN monitor (runs with one seed count once).",
        *_pooling_notes(rows, columns, headers, group_by),
        *_stale_notes(rows),
        "",
        "Columns (each holds one protocol; results measured another way get a column of their own):",
        *(_column_note(c, h) for c, h in zip(columns, headers, strict=True)),
        "",
        f"Read {len(sources)} result source(s) under: {', '.join(str(p) for p in paths)}.",
    ]
    if skipped:
        lines += ["", "Skipped (unusable):", *(f"- {escape(s)}" for s in skipped)]
    return "\n".join(lines) + "\n"


def build_report(paths: Sequence[str | os.PathLike], group_by: str = "checkpoint",
                 knn_ks: Sequence[int] | None = None, decimals: int = 1) -> Report:
    """Collect the results under `paths` and lay them out as one table (rows per checkpoint or per recipe)."""
    if group_by not in GROUP_BY:
        raise ReportError(f"--group-by {group_by!r}: expected one of {', '.join(GROUP_BY)}")
    found, skipped, sources = collect(paths, tuple(knn_ks) if knn_ks else (DEFAULT_KNN_K,))
    merge_detection_protocols(found)
    hashes: dict[Path, str] = {}
    rows = [_checkpoint_row(key, members, hashes) for key, members in _subjects(found).items()]
    if group_by == "recipe":
        rows = _group_rows(rows)
    rows.sort(key=_sort_key)
    _mark_differences(rows)
    columns, headers = _columns(rows)
    markdown = render_markdown(rows, columns, headers, group_by, paths, sources, skipped, decimals)
    return Report(rows, columns, headers, markdown, skipped, sources, group_by)


def _chart_label(label: str, width: int = 36) -> str:
    """Long lines keep their start and end (the run folder and the checkpoint's epoch)."""
    lines = []
    for line in label.split("\n"):
        if len(line) > width:
            head = (width - 1) // 2
            line = line[:head] + "…" + line[-(width - 1 - head):]
        lines.append(line)
    return "\n".join(lines)


def chart_labels(rows: Sequence[Row]) -> tuple[list[str], str]:
    """Bar-group names from what the table shows, since the chart has no switch columns.

    A recipe row is named by its switch cells that differ between recipe rows (`MLP, no aug+, T 0.2`) over its
    label; the label every recipe row shares is returned instead, for the chart's title ("" when none or one
    recipe row). Other rows (random init, checkpoints without a recipe) keep their label.
    """
    recipes = {id(row): _switch_values(row) for row in rows if row.recipe is not None and not row.baseline}
    varying = [j for j in range(len(SWITCHES)) if len({values[j] for values in recipes.values()}) > 1]
    names = {row.label for row in rows if id(row) in recipes}
    shared = names.pop() if len(names) == 1 and len(recipes) > 1 else ""
    labels = []
    for row in rows:
        values = recipes.get(id(row))
        if values is None:
            labels.append(row.label)
            continue
        parts = [name if values[j] == "✓" else f"no {name}" if values[j] == "" else f"{name} {values[j]}"
                 for j in varying for name in [SWITCHES[j][0]]]
        labels.append("\n".join(part for part in (", ".join(parts), "" if shared else row.label) if part) or row.label)
    return labels, shared


def write_report(report: Report, output: str | os.PathLike) -> tuple[Path, Path]:
    """The Markdown to `output` (atomically) and a bar chart of every column with results beside it (.png)."""
    md = Path(output)
    with atomic_open(md, "w") as f:
        f.write(report.markdown)
    series: dict[str, list[tuple[float, float] | None]] = {}
    for column, header in zip(report.columns, report.headers, strict=True):
        if not isinstance(column, Protocol):
            continue
        values: list[tuple[float, float] | None] = []
        for row in report.rows:
            cell = row.cells.get(column)
            if cell is None or not cell.values:
                values.append(None)
            else:
                std = statistics.stdev(cell.values) if len(cell.values) > 1 else 0.0
                values.append((statistics.fmean(cell.values), std))
        series[header] = values
    labels, shared = chart_labels(report.rows)
    title = f"moco report, per {report.group_by}" + (f": {shared}" if shared else "") + " (error bars: std)"
    png = save_bars([_chart_label(label) for label in labels], series, md.with_suffix(".png"), title)
    return md, png
