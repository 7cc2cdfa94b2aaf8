"""Bookkeeping of repeated detection fine-tuning trials: folders, seeds, states, metrics, the summary. No detectron2.

Layout of an output folder:
  run.json              what the trials were run with (checkpoint and training-target fingerprints, the target
                        config itself, the data root and its datasets' identity, the base seed), checked on
                        re-runs; also the memory pre-flight, the projected time, the line of every finished trial
                        and one history entry per invocation
  trial_<k>/            detectron2's OUTPUT_DIR of trial k (seed = base seed + k); `last_checkpoint` while running
  trial_<k>/progress.json  iteration, timed s/iter and peak memory, rewritten by the trial while it trains
  trial_<k>/oom_rank<r>.json  written by rank r when it ran out of GPU memory
  trial_<k>/metrics.json  written once the trial's evaluation is done: the trial is finished
  summary.json, summary.md  per-trial metrics with mean and sample std, rewritten after every trial

What metrics.json and summary.json hold depends on the benchmark (VOC: AP, AP50, AP75 at the top level; COCO:
"bbox" and "segm" with AP, AP50, AP75, APs, APm, APl each): `benchmarks` describes both layouts.

Only the process that runs a trial writes in its trial folder, and only the parent `moco eval voc|coco` process
writes run.json and the summaries, so trials running side by side never write the same file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from moco_transfer.fileio import atomic_open, write_json_atomic
from moco_transfer.markdown import table

from .benchmarks import VOC, Benchmark
from .schedule import Projection

METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.json"
OOM_GLOB = "oom_rank*.json"
STOPPED_FILE = "stopped.json"  # a trial's record of its stop on a signal: iteration, signal, checkpoint
RUN_FILE = "run.json"
RUN_VERSION = 2
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SUPERSEDED = "superseded"
METRIC_KEYS = VOC.metric_keys  # VOC's, at the top level of its metrics.json and summary rows
TRIAL_NAME = re.compile(r"trial_(\d+)")


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


def trial_state(folder: str | os.PathLike, benchmark: Benchmark = VOC) -> TrialState:
    folder = Path(folder)
    if read_metrics(folder, benchmark) is not None:
        return TrialState.FINISHED
    if (folder / "last_checkpoint").is_file():
        return TrialState.INTERRUPTED
    return TrialState.NEW


def _write_text_atomic(text: str, path: Path) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_metrics(folder: str | os.PathLike, metrics: dict[str, Any], seed: int, benchmark: Benchmark = VOC,
                  **extra: Any) -> dict[str, Any]:
    """Record a finished trial: `metrics` in the benchmark's stored layout (`Benchmark.record` makes it from an
    evaluator's result); percent, non-finite values as null. ValueError when a metric is missing."""
    values = benchmark.values(metrics)
    if values is None:
        raise ValueError(f"evaluation result lacks some of {benchmark.name}'s metrics "
                         f"{list(benchmark.tasks) if not benchmark.flat else ''}{list(benchmark.metric_keys)}; "
                         f"got {sorted(metrics)}")
    record = benchmark.record(values) | {"seed": seed} | extra
    write_json_atomic(record, Path(folder) / METRICS_FILE)
    return record


def read_json_record(path: str | os.PathLike) -> Any:
    """A JSON file's content, or None when it is absent or damaged: torn (a crash mid-write on a filesystem without
    atomic rename), not JSON, or not even UTF-8 (a disk or copy error). Damage is never fatal to a reader that
    can redo or skip what the file records (ValueError covers json's and UTF-8's decode errors)."""
    try:
        return json.loads(Path(path).read_bytes())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def read_metrics(folder: str | os.PathLike, benchmark: Benchmark = VOC) -> dict[str, Any] | None:
    """The metrics of a finished trial, or None (absent, or unreadable: then the trial is redone)."""
    record = read_json_record(Path(folder) / METRICS_FILE)
    if not isinstance(record, dict) or benchmark.values(record) is None:
        return None
    return record


def summarize(out_dir: str | os.PathLike, trials: int, info: dict[str, Any] | None = None,
              benchmark: Benchmark = VOC) -> dict[str, Any]:
    """Collect finished trials 0..trials-1, compute mean and sample std, write summary.json and summary.md."""
    out_dir = Path(out_dir)
    rows, per_trial = [], []
    for k in range(trials):
        m = read_metrics(trial_dir(out_dir, k), benchmark)
        if m is not None:
            values = benchmark.values(m)
            per_trial.append(values)
            rows.append({"trial": k, "seed": m.get("seed"), **benchmark.pack(values), "precision": precision_of(m)})
    mean: dict[str, dict[str, float | None]] = {}
    std: dict[str, dict[str, float | None]] = {}
    for task in benchmark.tasks:
        mean[task], std[task] = {}, {}
        for key in benchmark.metric_keys:
            got = [v[task][key] for v in per_trial if v[task][key] is not None]
            mean[task][key] = statistics.fmean(got) if got else None
            std[task][key] = statistics.stdev(got) if len(got) > 1 else None
    summary = {"benchmark": benchmark.name, "trials_requested": trials, "trials_finished": len(rows), "trials": rows,
               "mean": benchmark.pack(mean), "std": benchmark.pack(std), **(info or {})}
    write_json_atomic(summary, out_dir / SUMMARY_JSON)
    _write_text_atomic(summary_markdown(summary, benchmark), out_dir / SUMMARY_MD)
    return summary


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_markdown(summary: dict[str, Any], benchmark: Benchmark = VOC) -> str:
    columns = benchmark.columns()

    def cells(record: dict[str, Any]) -> list[str]:
        values = benchmark.values(record) or {}
        return [_fmt(values.get(task, {}).get(key)) for task, key, _ in columns]

    rows = [[r["trial"], r["seed"], *cells(r), r.get("precision") or "-"] for r in summary["trials"]]
    rows += [[name, "", *cells(summary[name]), ""] for name in ("mean", "std")]
    lines = [f"{benchmark.title}, {summary['trials_finished']} of {summary['trials_requested']} trials finished", "",
             *table(["trial", "seed", *(h for _, _, h in columns), "precision"], rows), "",
             "std is the sample standard deviation over finished trials."]
    return "\n".join(lines) + "\n"


def precision_of(metrics: dict[str, Any]) -> str | None:
    """fp32, amp, or e.g. "fp32, then amp from it. 1200" for a trial resumed in another precision; None if unknown.

    The rule: the precision of the first segment, then for every segment whose precision differs from the one
    before, ", then <precision> from it. <its start iteration>" (docs/voc.md shows the same form).
    """
    segments = metrics.get("segments")
    if not isinstance(segments, list) or not segments:
        amp = metrics.get("amp")
        return None if amp is None else ("amp" if amp else "fp32")
    names = [("amp" if seg.get("amp") else "fp32", seg.get("start_iter")) for seg in segments]
    merged = [names[0]]
    for name, start in names[1:]:
        if name != merged[-1][0]:
            merged.append((name, start))
    if len(merged) == 1:
        return merged[0][0]
    return ", then ".join(f"{n} from it. {st}" if i else n for i, (n, st) in enumerate(merged))


def format_trial_line(k: int, trials: int, m: dict[str, Any], benchmark: Benchmark = VOC) -> str:
    """The line printed (and kept in run.json) when a trial finishes."""
    prec = precision_of(m)
    return f"trial {k + 1}/{trials} (seed {m.get('seed')}): {benchmark.format(m)}" + (f" [{prec}]" if prec else "")


# --- the run record ------------------------------------------------------------------------------------------


def read_run(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(out_dir) / RUN_FILE
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise RunMismatch(f"{path} is not valid JSON ({exc}); move it away to start this folder afresh") from None
    return record if isinstance(record, dict) else {}


def update_run(out_dir: str | os.PathLike, edit: Callable[[dict[str, Any]], None] | None = None,
               **sections: Any) -> dict[str, Any]:
    """Read run.json once, set the given top-level sections and apply `edit`, write it back atomically (parent
    process only)."""
    record = read_run(out_dir) or {}
    record.update(sections)
    if edit is not None:
        edit(record)
    write_json_atomic(record, Path(out_dir) / RUN_FILE)
    return record


def folder_states(out_dir: str | os.PathLike, benchmark: Benchmark = VOC) -> dict[int, TrialState]:
    """The state of every trial_<k> folder of an output folder (a trial without a folder is NEW)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return {}
    states = {}
    for p in out_dir.iterdir():
        m = TRIAL_NAME.fullmatch(p.name)
        if m and p.is_dir():
            states[int(m.group(1))] = trial_state(p, benchmark)
    return dict(sorted(states.items()))


def _describe_dataset(entry: Any) -> str:
    if not isinstance(entry, dict):
        return "(absent)"
    return f"{entry.get('images', '?')} images (sha256 {str(entry.get('sha256'))[:12]})"


def data_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """How the recorded data differs from this run's, as a phrase; None when it is the same or not recorded.

    The data is identified by content (`datasets`: images and the sha256 of each dataset's split or annotation
    file), so a copy of the same files at another root (a job's scratch disk) is the same data. Only where the
    content is not recorded on both sides (a config whose datasets are not under the root) do the roots decide.
    """
    a, b = old.get("datasets"), new.get("datasets")
    ra, rb = old.get("data_root"), new.get("data_root")
    where = f" (root {ra} -> {rb})" if ra and rb and ra != rb else ""
    if a and b:
        if a == b:
            return None
        changed = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        return ("dataset files" + where + ": "
                + ", ".join(f"{n} {_describe_dataset(a.get(n))} -> {_describe_dataset(b.get(n))}" for n in changed))
    if ra and rb and ra != rb:
        return f"dataset root {ra} -> {rb}"
    return None


def data_root_moved(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """A note when the root differs but the recorded datasets are the same files (not a difference)."""
    ra, rb = old.get("data_root"), new.get("data_root")
    if ra and rb and ra != rb and data_difference(old, new) is None:
        return f"dataset root {ra} -> {rb}, the same dataset files (split/annotation sha256)"
    return None


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """What differs between the recorded fingerprint and this run's, as phrases for a message (empty: same).

    Records of version 2 hold the training-target config itself, so the differing keys are named. An older
    record (no version) hashed the whole config; it is compared against `legacy_config_sha256`. The data and the
    base seed are compared where both sides hold them (a record from before they were pinned holds neither; see
    `inspect_run` for the seed).
    """
    out = []
    if old.get("checkpoint_sha256") != new.get("checkpoint_sha256"):
        out.append(f"checkpoint (sha256 {str(old.get('checkpoint_sha256'))[:12]} -> "
                   f"{str(new.get('checkpoint_sha256'))[:12]})")
    if old.get("seed") is not None and new.get("seed") is not None and old["seed"] != new["seed"]:
        out.append(f"base seed ({old['seed']} -> {new['seed']}; trial k trains with base seed + k)")
    if (data := data_difference(old, new)) is not None:
        out.append(data)
    if old.get("version") is None:
        if old.get("config_sha256") != new.get("legacy_config_sha256"):
            out.append("config (recorded by an earlier version as config_sha256 "
                       f"{str(old.get('config_sha256'))[:12]})")
        return out
    if old.get("config_sha256") == new.get("config_sha256"):
        return out
    a, b = old.get("config") or {}, new.get("config") or {}
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = [f"{k} {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in keys[:limit]]
    if len(keys) > limit:
        shown.append(f"and {len(keys) - limit} more")
    out.append("config: " + ", ".join(shown) if shown else "config (config_sha256 differs)")
    return out


@dataclass
class RunCheck:
    """How this invocation relates to what the output folder holds."""

    recorded: bool  # the folder has a run.json
    differences: list[str] = field(default_factory=list)
    states: dict[int, TrialState] = field(default_factory=dict)  # every trial folder's, read once per run
    same_checkpoint: bool = False
    record: dict[str, Any] = field(default_factory=dict)  # run.json as read (empty when absent)
    moved: str | None = None  # the data root changed, the dataset files did not: a note, not a difference

    def state(self, k: int) -> TrialState:
        return self.states.get(k, TrialState.NEW)

    @property
    def finished(self) -> list[int]:
        return [k for k, s in self.states.items() if s is TrialState.FINISHED]

    @property
    def interrupted(self) -> list[int]:
        return [k for k, s in self.states.items() if s is TrialState.INTERRUPTED]

    @property
    def has_progress(self) -> bool:
        return bool(self.finished or self.interrupted)


def trials_base_seed(out_dir: str | os.PathLike, states: dict[int, TrialState], benchmark: Benchmark = VOC
                     ) -> int | None:
    """The base seed the folder's trials ran with, from what they recorded: a finished trial's metrics.json seed,
    an interrupted one's config.yaml SEED (trial k ran with base + k). None when no trial with progress says."""
    for k, state in states.items():
        seed = None
        if state is TrialState.FINISHED:
            seed = (read_metrics(trial_dir(out_dir, k), benchmark) or {}).get("seed")
        elif state is TrialState.INTERRUPTED:
            try:
                seed = (yaml.safe_load((trial_dir(out_dir, k) / "config.yaml").read_bytes()) or {}).get("SEED")
            except (OSError, ValueError, AttributeError, yaml.YAMLError):
                seed = None
        if isinstance(seed, int) and not isinstance(seed, bool):
            return seed - k
    return None


def inspect_run(out_dir: str | os.PathLike, fingerprint: dict[str, Any], benchmark: Benchmark = VOC) -> RunCheck:
    """Compare `fingerprint` with the folder's run.json and take the state of its trials: the run's one reading of
    both (the runner keeps the record and the states from here).

    A record written before the base seed was pinned gets it from the trials themselves, so `--seed 10` on a
    folder whose trials ran with seed 0 is refused there too, not skipped trial by trial.
    """
    old = read_run(out_dir)
    states = folder_states(out_dir, benchmark)
    if old is None:
        return RunCheck(False, [], states, False, {})
    compared = old
    if old.get("seed") is None and fingerprint.get("seed") is not None:
        base = trials_base_seed(out_dir, states, benchmark)
        compared = old if base is None else {**old, "seed": base}
    return RunCheck(True, fingerprint_differences(compared, fingerprint), states,
                    old.get("checkpoint_sha256") == fingerprint.get("checkpoint_sha256"), old,
                    data_root_moved(old, fingerprint))


def mismatch_message(out_dir: str | os.PathLike, check: RunCheck) -> str:
    parts = []
    if check.finished:
        parts.append(f"{len(check.finished)} finished trial(s) ({', '.join(map(str, check.finished))})")
    if check.interrupted:
        parts.append(f"{len(check.interrupted)} interrupted trial(s) with a checkpoint "
                     f"({', '.join(map(str, check.interrupted))})")
    return (f"output folder {out_dir} holds {' and '.join(parts)} run with a different "
            + "; ".join(check.differences)
            + ". They cannot be resumed or averaged with this run's: choose another --output (the default one "
              "names the checkpoint's hash, a non-default config or --opts, and the seed), or add --fresh to move "
              f"them to {Path(out_dir) / SUPERSEDED}/<time>/ and start over here (`moco report` leaves superseded "
              "trials out unless that folder is named). (Precision, GPU count, --parallel-trials, data-loader "
              "workers, checkpoint period and a copy of the same dataset files elsewhere may change between runs.)")


def supersede(out_dir: str | os.PathLike, keep: Sequence[str] = ()) -> Path | None:
    """Move the folder's trials, summaries and run.json to superseded/<UTC time>/; returns it (None: nothing)."""
    out_dir = Path(out_dir)
    names = [p.name for p in sorted(out_dir.iterdir()) if p.name not in keep and p.name != SUPERSEDED
             and (TRIAL_NAME.fullmatch(p.name) or p.name in (RUN_FILE, SUMMARY_JSON, SUMMARY_MD))]
    if not names:
        return None
    target = out_dir / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    n = 1
    while target.exists():
        target = target.with_name(target.name.split("+")[0] + f"+{n}")
        n += 1
    target.mkdir(parents=True)
    for name in names:
        shutil.move(str(out_dir / name), str(target / name))
    return target


def read_progress(folder: str | os.PathLike) -> dict[str, Any] | None:
    d = read_json_record(Path(folder) / PROGRESS_FILE)
    return d if isinstance(d, dict) else None


def read_oom(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The out-of-memory record of a trial's rank that failed first (lowest iteration), if any."""
    records = [r for path in sorted(Path(folder).glob(OOM_GLOB)) if isinstance(r := read_json_record(path), dict)]
    return min(records, key=lambda r: (r.get("iteration") or 0, r.get("rank") or 0)) if records else None


def clear_trial_records(folder: str | os.PathLike) -> None:
    """Remove a trial's progress, out-of-memory and stop records before it (re)starts (parent, trial not running)."""
    folder = Path(folder)
    for path in [folder / PROGRESS_FILE, folder / STOPPED_FILE, *folder.glob(OOM_GLOB)]:
        path.unlink(missing_ok=True)


# --- the parent's bookkeeping while trials run ---------------------------------------------------------------


class RunBook:
    """The parent's view of a run: writes run.json and the summaries, prints trial lines and the projection.

    Thread-safe: a monitor thread polls the running trials' progress.json while the main thread waits on them.
    """

    def __init__(self, out_dir: Path, trials: int, info: dict[str, Any], echo: Callable[[str], None],
                 parallel: int = 1, benchmark: Benchmark = VOC) -> None:
        self.out_dir, self.trials, self.info, self.echo, self.parallel = Path(out_dir), trials, info, echo, parallel
        self.benchmark = benchmark
        self.lock = threading.Lock()
        self.plan: list[tuple[int, int]] = []  # (trial, remaining iterations) in run order
        self.running: set[int] = set()
        self.projection: Projection | None = None

    def summarize(self) -> dict[str, Any]:
        with self.lock:
            return summarize(self.out_dir, self.trials, self.info, self.benchmark)

    def started(self, k: int) -> None:
        with self.lock:
            self.running.add(k)

    def finished(self, k: int) -> dict[str, Any] | None:
        """Book a trial whose process ended: its line if it has metrics, and the summaries. Returns the metrics."""
        with self.lock:
            self.running.discard(k)
            bm = self.benchmark
            m = read_metrics(trial_dir(self.out_dir, k), bm)
            if m is None:
                return None
            line = format_trial_line(k, self.trials, m, bm)
            entry = {"line": line, "seed": m.get("seed"), **bm.pack(bm.values(m)), "precision": precision_of(m),
                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

            def add_line(record: dict[str, Any]) -> None:
                record["trial_lines"] = {**(record.get("trial_lines") or {}), str(k): entry}

            update_run(self.out_dir, add_line)
            summarize(self.out_dir, self.trials, self.info, bm)
        self.echo(f"{line} -> {self.out_dir / SUMMARY_MD}")
        return m

    def poll(self) -> None:
        """Make the projection once a trial of this run has timed its iterations after warm-up.

        Every planned trial is looked at, not only running ones: a short trial can end between two polls. Their
        progress files were cleared before this run started them, so any found is this run's.
        """
        with self.lock:
            if self.projection is not None or not self.plan:
                return
            for k, _ in self.plan:
                p = read_progress(trial_dir(self.out_dir, k))
                if p and p.get("s_per_iter"):
                    window = tuple(p.get("window") or (0, 0))
                    self.projection = Projection(float(p["s_per_iter"]), [n for _, n in self.plan],
                                                 min(self.parallel, len(self.plan)), k, window)
                    update_run(self.out_dir, projection=self.projection.to_json())
                    break
            else:
                return
        self.echo(self.projection.line())


class Monitor:
    """Calls `book.poll()` every `every_s` seconds in a daemon thread while the `with` block runs."""

    def __init__(self, book: RunBook, every_s: float = 2.0) -> None:
        self.book, self.every_s = book, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trial-monitor", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.book.poll()
            except (OSError, ValueError):  # a file caught mid-replace on a slow filesystem: try again next tick
                continue

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.book.poll()
