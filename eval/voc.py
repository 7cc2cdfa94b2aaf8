"""`moco eval voc`: fine-tune a MoCo backbone on PASCAL VOC07+12 with detectron2, N trials, and summarise.

Everything that can fail is checked before the first iteration: detectron2 importable, the config valid, the
VOC folders complete, the GPUs present, the converted backbone loading into every backbone and res5 tensor of the
built model (no silent partial load), the output folder's earlier trials compatible, and, on GPUs, the memory:
probe iterations at the largest input (`voc_probe`, decided by `voc_memory`). Each trial runs in `trial_<k>/`
with seed base+k, through detectron2's `launch` (one process per GPU, or in this process on CPU / one GPU), one
after another or, with --parallel-trials, several at once as subprocesses on their own GPU groups
(`voc_schedule`). A finished trial (metrics.json present) is skipped; an interrupted one resumes from its last
checkpoint. SIGTERM or SIGUSR1 stops the run: running trials save a detectron2 checkpoint (a signal that reaches
only this process is passed on to them), no further trial starts, and the command exits 75 (VocStopped); the
same command then resumes. Bookkeeping lives in `voc_trials`, the trial process in `voc_train`, the VOC layout
in `voc_layout`, the GPU rule in `gpu_scaling`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco_transfer.checkpoint import CheckpointError
from moco_transfer.convert import convert, read_detectron2_weights
from moco_transfer.detection_configs import VOC_24K, resolve_config
from moco_transfer.detectron2_ext import Detectron2Missing, register, require_detectron2
from moco_transfer.fileio import describe_key_mismatch, sha256_file
from moco_transfer.signals import StoppedBySignal, StopRequest

from .gpu_scaling import Change, scale_to_gpus
from .voc_layout import VocLayoutError, check_voc_root, our_name
from .voc_memory import MemoryPlan, TrialShape, plan_memory
from .voc_schedule import (
    DIST_URL_ENV,
    PoolJob,
    PortBook,
    child_env,
    gpu_groups,
    last_checkpoint_iteration,
    remaining_iterations,
    run_pool,
    trial_stopped,
    visible_devices,
    wait_forwarding,
)
from .voc_train import EXIT_OOM, TrialOutOfMemory, register_voc, run_trial, stop_request
from .voc_trials import (
    RUN_VERSION,
    STOPPED_FILE,
    Monitor,
    RunBook,
    RunMismatch,
    TrialState,
    clear_trial_records,
    inspect_run,
    mismatch_message,
    read_metrics,
    read_oom,
    read_progress,
    read_run,
    supersede,
    trial_dir,
    trial_seed,
    trial_state,
    update_run,
)

__all__ = ["REPORTED_ERRORS", "SETUP_ERRORS", "VocOptions", "VocStopped", "preflight", "register_voc", "run_trial",
           "run_voc"]

CONVERTED_NAME = "backbone_d2.pkl"
IGNORED_WEIGHT_PREFIXES = ("stem.fc.",)  # the MoCo authors' converter leaves the projection head in as stem.fc.*


class VocSetupError(RuntimeError):
    """A problem found before training (config, GPUs, weights); the message says what to fix."""


class VocOutOfMemory(RuntimeError):
    """A trial does not fit in GPU memory (pre-flight) or ran out of it (training); the message lists options."""


class TrialFailed(RuntimeError):
    """A trial's process ended with an error other than out-of-memory; the message points at its log."""


class VocStopped(StoppedBySignal):
    """The run stopped on a signal (exit code 75); stopped trials kept a checkpoint, the same command resumes."""


def stopped_error(options: VocOptions, stopped: Sequence[int], stop: StopRequest) -> VocStopped:
    """The message for a stopped run: each stopped trial, its signal and iteration, from its stopped.json."""
    parts = []
    for k in stopped:
        folder = trial_dir(options.output, k)
        try:
            rec = json.loads((folder / STOPPED_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            rec = {}
        why = rec.get("signal") or stop.signal_name or "a signal"
        where = (f"after iteration {rec['iteration']} of {rec['max_iter']} (checkpoint {folder / rec['checkpoint']})"
                 if "checkpoint" in rec else f"(resumes from {folder}'s last checkpoint, if any)")
        parts.append(f"trial {k + 1}/{options.trials} (seed {trial_seed(options.seed, k)}) stopped by {why} {where}")
    if not parts:
        parts.append(f"stopped by {stop.signal_name or 'a signal'} between trials")
    return VocStopped("; ".join(parts) + ". No further trial started; run the same command again to resume.")


# Everything `moco eval voc` reports as a plain error message before training starts.
SETUP_ERRORS = (Detectron2Missing, VocSetupError, VocLayoutError, RunMismatch)
# ... and everything it reports as a plain message at all.
REPORTED_ERRORS = (*SETUP_ERRORS, VocOutOfMemory, TrialFailed)
# Config keys that do not change what a trial optimises: changing them keeps the resume of interrupted trials.
EXECUTION_KEYS = ("OUTPUT_DIR", "SEED", "MODEL.WEIGHTS", "MODEL.DEVICE", "SOLVER.AMP.ENABLED",
                  "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD", "VIS_PERIOD", "CUDNN_BENCHMARK")


@dataclass
class VocOptions:
    checkpoint: Path
    voc_root: Path
    output: Path
    trials: int = 5
    gpus: int | None = None  # None: every visible CUDA device, else CPU (0)
    config: str = VOC_24K
    opts: Sequence[str] = field(default_factory=list)
    seed: int = 0
    scale_to_gpus: bool = False
    max_ims_per_gpu: int = 4
    dist_url: str = "auto"
    amp: bool = False
    parallel_trials: int = 1
    fresh: bool = False

    @property
    def gpus_per_trial(self) -> int:
        return (self.gpus or 0) // max(1, self.parallel_trials)


# --- configuration ------------------------------------------------------------------------------------------


def build_config(options: VocOptions, echo: Callable[[str], None] = print) -> Any:
    """detectron2 CfgNode: shipped/user YAML, then the GPU rule (if asked), then --opts; datasets at --voc-root."""
    require_detectron2()
    register()
    from detectron2.config import get_cfg

    try:
        path = resolve_config(options.config)
    except FileNotFoundError as exc:
        raise VocSetupError(f"--config: {exc}") from exc
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(path))
    except Exception as exc:
        raise VocSetupError(f"--config {path}: not a valid detectron2 config ({type(exc).__name__}: {exc})") from exc
    per_trial = options.gpus_per_trial
    if options.scale_to_gpus:
        changes = scale_to_gpus(cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, tuple(cfg.SOLVER.STEPS),
                                cfg.SOLVER.MAX_ITER, per_trial, options.max_ims_per_gpu)
        _apply_changes(cfg, changes)
        devices = f"{per_trial} GPU(s) per trial" if per_trial else "CPU"
        echo(f"--scale-to-gpus ({devices}): " + ("; ".join(map(str, changes)) if changes else "no change needed"))
    if options.amp:
        cfg.SOLVER.AMP.ENABLED = True
    if len(options.opts) % 2:
        raise VocSetupError(f"--opts takes KEY VALUE pairs; got an odd count: {list(options.opts)}")
    try:
        cfg.merge_from_list(list(options.opts))
    except Exception as exc:
        raise VocSetupError(f"--opts {list(options.opts)}: {type(exc).__name__}: {exc}") from exc
    cfg.MODEL.DEVICE = "cuda" if per_trial > 0 else "cpu"
    if cfg.SOLVER.AMP.ENABLED and per_trial == 0:
        raise VocSetupError("--amp (SOLVER.AMP.ENABLED) needs CUDA GPUs: detectron2's AMP trainer runs fp16 autocast "
                            "on CUDA only; a CPU run trains in fp32 (drop --amp, or pass --gpus N)")
    cfg.DATASETS.TRAIN = tuple(our_name(n) for n in cfg.DATASETS.TRAIN)
    cfg.DATASETS.TEST = tuple(our_name(n) for n in cfg.DATASETS.TEST)
    if not cfg.DATASETS.TEST:
        raise VocSetupError("config has no DATASETS.TEST; a trial needs a test set to report AP")
    return cfg


def _apply_changes(cfg: Any, changes: Sequence[Change]) -> None:
    for ch in changes:
        node = cfg
        *parents, leaf = ch.key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, ch.new)


def target_config(cfg: Any) -> dict[str, Any]:
    """The config as flat KEY: value pairs, minus the EXECUTION_KEYS: what a trial optimises (JSON-normalised)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key in sorted(node):
            name = f"{prefix}{key}"
            if isinstance(node[key], dict):
                walk(node[key], name + ".")
            elif name not in EXECUTION_KEYS:
                flat[name] = node[key]

    walk(cfg, "")
    return json.loads(json.dumps(flat, default=str))


def _legacy_config_sha256(cfg: Any) -> str:
    """The hash run.json held before version 2: the whole config but output folder, seed, weights and device."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR, c.SEED, c.MODEL.WEIGHTS, c.MODEL.DEVICE = "", -1, "", ""
    return hashlib.sha256(c.dump().encode()).hexdigest()


def run_fingerprint(cfg: Any, checkpoint_sha256: str) -> dict[str, Any]:
    """What run.json pins: the checkpoint and the training target; precision, GPUs and workers are free."""
    target = target_config(cfg)
    return {"version": RUN_VERSION, "checkpoint_sha256": checkpoint_sha256,
            "config_sha256": hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest(),
            "legacy_config_sha256": _legacy_config_sha256(cfg), "config": target}


# --- weights ------------------------------------------------------------------------------------------------


def prepare_weights(checkpoint: Path, out_dir: Path, reuse: bool = False,
                    echo: Callable[[str], None] = print) -> tuple[Path, dict]:
    """A detectron2 .pkl for the run: the checkpoint itself if it is one, else its conversion in `out_dir`.

    A `.pkl` passed by the user is read as detectron2 weights (numpy-only unpickler); anything else is read as a
    MoCo checkpoint with weights_only=True and converted. `reuse` (the folder's run.json matched this checkpoint)
    keeps an earlier conversion.
    """
    if checkpoint.suffix == ".pkl":
        return checkpoint, read_detectron2_weights(checkpoint)["model"]
    target = out_dir / CONVERTED_NAME
    if not (reuse and target.is_file()):
        summary = convert(checkpoint, target, target="detectron2", force=True)
        echo(summary.format())
    return target, read_detectron2_weights(target)["model"]


def expected_weight_names(model_state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model key -> name it must have in the weights file: every backbone tensor and res5 (minus the extra norm)."""
    out = {}
    for key in model_state:
        if key.startswith("backbone."):
            out[key] = key.removeprefix("backbone.")
        elif key.startswith("roi_heads.res5.") and not key.startswith("roi_heads.res5.norm."):
            out[key] = key.removeprefix("roi_heads.")
    return out


def check_weights(cfg: Any, weights_path: Path, weights: dict[str, Any]) -> dict[str, int]:
    """Build the model, compare names and shapes, then load with detectron2's checkpointer and verify values.

    Raises VocSetupError listing missing, unexpected and mis-shaped keys, or tensors whose values did not
    arrive through detectron2's matching. Returns counts for the log.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    c = cfg.clone()
    c.defrost()
    c.MODEL.DEVICE = "cpu"
    model = build_model(c)
    state = model.state_dict()
    expected = expected_weight_names(state)
    names = {k for k in weights if not k.startswith(IGNORED_WEIGHT_PREFIXES)}
    problems = describe_key_mismatch({w: tuple(state[m].shape) for m, w in expected.items()},
                                     {w: tuple(np.shape(weights[w])) for w in names})
    if problems:
        raise VocSetupError(f"weights {weights_path} do not match the config's backbone "
                            f"(RESNETS.DEPTH {cfg.MODEL.RESNETS.DEPTH}, ROI head {cfg.MODEL.ROI_HEADS.NAME}): "
                            + "; ".join(problems))
    DetectionCheckpointer(model).load(str(weights_path))
    loaded = model.state_dict()
    not_loaded = sorted(w for m, w in expected.items()
                        if not np.array_equal(loaded[m].cpu().numpy(), np.asarray(weights[w])))
    if not_loaded:
        raise VocSetupError(f"detectron2 did not load {len(not_loaded)} backbone tensors of {weights_path} "
                            f"(e.g. {', '.join(not_loaded[:6])})")
    del model
    return {"backbone_tensors": len(expected), "weight_tensors": len(weights)}


# --- the command --------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What the pre-flight established for the trials."""

    cfg: Any
    weights_path: Path
    fingerprint: dict[str, Any]
    groups: list[list[str]]  # one device group per concurrently running trial ([] = CPU)
    shape: TrialShape
    memory: MemoryPlan | None = None


def _trial_shape(cfg: Any, options: VocOptions, visible: int) -> TrialShape:
    s = cfg.SOLVER
    return TrialShape(int(s.IMS_PER_BATCH), float(s.BASE_LR), tuple(int(x) for x in s.STEPS), int(s.MAX_ITER),
                      options.gpus_per_trial, bool(s.AMP.ENABLED), options.max_ims_per_gpu,
                      options.parallel_trials, visible)


def preflight(options: VocOptions, echo: Callable[[str], None] = print) -> Prepared:
    """All checks that need no training; the output folder's run.json is (re)written only when all pass."""
    if options.gpus is None:
        options.gpus = torch.cuda.device_count()
    if options.trials < 1:
        raise VocSetupError(f"--trials must be at least 1, got {options.trials}")
    if options.gpus < 0:
        raise VocSetupError(f"--gpus must be >= 0 (0 = CPU), got {options.gpus}")
    visible = visible_devices(os.environ, torch.cuda.device_count())
    try:
        groups = gpu_groups(visible, options.gpus, options.parallel_trials)
    except ValueError as exc:
        raise VocSetupError(str(exc)) from None
    cfg = build_config(options, echo)
    devices = max(1, options.gpus_per_trial)
    if cfg.SOLVER.IMS_PER_BATCH % devices:
        raise VocSetupError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by {devices} GPUs "
                            "per trial")
    counts = check_voc_root(options.voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    echo("VOC datasets: " + ", ".join(f"{our_name(n)} ({c} images)" for n, c in counts.items()))
    if not options.checkpoint.is_file():
        raise VocSetupError(f"checkpoint {options.checkpoint}: file not found")
    options.output.mkdir(parents=True, exist_ok=True)
    fingerprint = run_fingerprint(cfg, sha256_file(options.checkpoint))
    check = inspect_run(options.output, fingerprint)
    if check.differences and check.has_progress and not options.fresh:
        raise RunMismatch(mismatch_message(options.output, check))
    try:
        weights_path, weights = prepare_weights(options.checkpoint, options.output,
                                                reuse=check.recorded and check.same_checkpoint, echo=echo)
    except CheckpointError as exc:
        raise VocSetupError(str(exc)) from exc
    register_voc(options.voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    counts = check_weights(cfg, weights_path, weights)
    echo(f"weights {weights_path}: all {counts['backbone_tensors']} backbone/res5 tensors load into the model "
         f"(roi_heads.res5.norm, the head's extra norm layer, starts from its default init)")
    prep = Prepared(cfg, weights_path, fingerprint, groups, _trial_shape(cfg, options, len(visible)))
    prep.memory = memory_preflight(prep, options, echo)
    # recorded only once everything above passed
    if options.fresh and (moved := supersede(options.output)) is not None:
        echo(f"--fresh: earlier trials and records moved to {moved}")
    elif check.differences:
        echo(f"{options.output}: earlier settings differ ({'; '.join(check.differences)}) but no trial has a "
             "checkpoint or result yet: recording this run's settings")
    _record_run(options, prep, fresh=options.fresh or bool(check.differences))
    cfg.MODEL.WEIGHTS = str(weights_path.resolve())
    return prep


def _record_run(options: VocOptions, prep: Prepared, fresh: bool) -> None:
    """run.json: the fingerprint, this invocation's execution settings and memory check, one history entry."""
    old = {} if fresh else (read_run(options.output) or {})
    execution = {"amp": bool(prep.cfg.SOLVER.AMP.ENABLED), "gpus": options.gpus,
                 "gpus_per_trial": options.gpus_per_trial, "parallel_trials": options.parallel_trials,
                 "ims_per_gpu": prep.shape.setting.ims_per_gpu,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    history = [*(old.get("history") or []), execution]
    sections = {k: v for k, v in old.items() if k in ("trial_lines", "projection")}
    record = {**prep.fingerprint, **sections, "execution": execution, "history": history,
              "memory": prep.memory.to_json() if prep.memory else None}
    if fresh:
        (options.output / "run.json").unlink(missing_ok=True)
    update_run(options.output, **record)


def run_gpus(groups: Sequence[Sequence[str]]) -> list[str]:
    """Every GPU the run uses, each once, in order: what the memory pre-flight reads."""
    return list(dict.fromkeys(d for group in groups for d in group))


def probe_argv(cfg_file: Path, voc_root: Path, shape: TrialShape, gpu_ids: Sequence[str],
               failed_at: str | None = None, failed_peak: int | None = None) -> list[str]:
    """The command of the probe process (`voc_probe`)."""
    cmd = [sys.executable, "-m", "moco_transfer.eval.voc_probe", str(cfg_file), str(voc_root),
           "--shape", json.dumps(asdict(shape)), "--gpu-ids", ",".join(gpu_ids)]
    if failed_at is not None:
        cmd += ["--failed-at", failed_at] + ([] if failed_peak is None else ["--failed-peak", str(failed_peak)])
    return cmd


def _probe_plan(prep: Prepared, options: VocOptions, echo: Callable[[str], None], failed_at: str | None = None,
                failed_peak: int | None = None) -> MemoryPlan | None:
    """Run `voc_probe` in a fresh process that sees every GPU of the run; None if it could not run.

    A fresh process, also for the re-probe after a training OOM: the trial processes have ended by then and this
    process never holds a CUDA context (GPU trials run in subprocesses), so the free memory read is the GPUs'.
    A probe that fails for a reason other than memory raises VocSetupError with its message.
    """
    cfg_file = options.output / "probe_config.yaml"
    cfg_file.write_text(prep.cfg.dump())
    gpus = run_gpus(prep.groups)
    cmd = probe_argv(cfg_file, options.voc_root, prep.shape, gpus, failed_at, failed_peak)
    echo(f"memory pre-flight: probe iterations at the largest training size on GPU {', '.join(gpus)} ...")
    try:
        proc = subprocess.run(cmd, env=child_env(os.environ, gpus, 1), capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        echo("warning: memory probe timed out after 30 min; continuing without it")
        return None
    finally:
        cfg_file.unlink(missing_ok=True)
    from .voc_probe import RESULT_MARK

    result = next((json.loads(line[len(RESULT_MARK):]) for line in reversed(proc.stdout.splitlines())
                   if line.startswith(RESULT_MARK)), None)
    if result is not None and "error" in result:
        raise VocSetupError(f"memory pre-flight: the probe failed on GPU {', '.join(gpus)}: {result['error']}")
    if result is None or "skipped" in result:
        why = result["skipped"] if result else "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        echo(f"warning: memory probe could not run ({why}); continuing without it")
        return None
    return MemoryPlan.from_json(result)


def memory_preflight(prep: Prepared, options: VocOptions, echo: Callable[[str], None]) -> MemoryPlan | None:
    """On GPUs: does a trial fit? Raises VocOutOfMemory with the options that do. On CPU: skipped."""
    if options.gpus_per_trial == 0:
        echo("memory pre-flight: skipped on the CPU (it measures GPU memory)")
        return None
    if all(trial_state(trial_dir(options.output, k)) is TrialState.FINISHED for k in range(options.trials)):
        echo("memory pre-flight: skipped, every trial is finished")
        return None
    plan = _probe_plan(prep, options, echo)
    if plan is None:
        return None
    if not plan.fits:
        raise VocOutOfMemory(plan.message())
    echo(plan.summary_line())
    return plan


def out_of_memory_error(prep: Prepared, options: VocOptions, k: int, echo: Callable[[str], None]) -> VocOutOfMemory:
    """The message for a trial that ran out of GPU memory while training: the same kind as the pre-flight's."""
    folder = trial_dir(options.output, k)
    rec = read_oom(folder) or {}
    it, max_iter = rec.get("iteration"), int(prep.cfg.SOLVER.MAX_ITER)
    where = (f"trial {k + 1} (seed {trial_seed(options.seed, k)}), "
             + ("evaluation" if rec.get("phase") == "evaluation" else
                f"iteration {'?' if it is None else it + 1} of {max_iter}"))
    peak = rec.get("reserved_bytes")
    plan = None
    if options.gpus_per_trial > 0:
        plan = _probe_plan(prep, options, echo, failed_at=where, failed_peak=peak)
    if plan is None:
        plan = plan_memory(prep.shape, rec.get("free_bytes"), rec.get("total_bytes"), None, failed_peak=peak,
                           failed_at=where, device=rec.get("device") or "")
    last = last_checkpoint_iteration(folder)
    if last is None:
        keep = (f"{folder} has no checkpoint yet (SOLVER.CHECKPOINT_PERIOD {prep.cfg.SOLVER.CHECKPOINT_PERIOD}): "
                "a re-run starts this trial from the beginning, with any setting.")
    else:
        done = max_iter if last < 0 else last + 1
        keep = (f"{folder} keeps its checkpoint after iteration {done}: a re-run with --amp or more GPUs resumes "
                "it there; a schedule change (--scale-to-gpus) needs --fresh or another --output.")
    return VocOutOfMemory(f"{plan.message()}\n{keep}")


def _fmt_metrics(m: dict[str, Any]) -> str:
    return " ".join(f"{k} {'-' if m[k] is None else format(m[k], '.2f')}" for k in ("AP", "AP50", "AP75"))


def run_voc(options: VocOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Pre-flight, then every unfinished trial (in order, or --parallel-trials at once); summary after each."""
    prep = preflight(options, echo)  # first: it reports a missing detectron2 with instructions
    cfg = prep.cfg
    info = {"checkpoint": str(options.checkpoint), "weights": str(prep.weights_path), "config": str(options.config),
            "opts": list(options.opts)}
    book = RunBook(options.output, options.trials, info, echo, parallel=len(prep.groups))
    summary = book.summarize()
    todo: list[tuple[int, int, Path, TrialState]] = []
    for k in range(options.trials):
        folder = trial_dir(options.output, k)
        state = trial_state(folder)
        seed = trial_seed(options.seed, k)
        if state is TrialState.FINISHED:
            m = read_metrics(folder)
            echo(f"trial {k + 1}/{options.trials} (seed {seed}): finished earlier ({_fmt_metrics(m)}), skipped")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tcfg = cfg.clone()
        tcfg.defrost()
        tcfg.OUTPUT_DIR, tcfg.SEED = str(folder.resolve()), seed
        (folder / "config.yaml").write_text(tcfg.dump())
        clear_trial_records(folder)
        todo.append((k, seed, folder, state))
    if not todo:
        return summary
    book.plan = [(k, remaining_iterations(folder, int(cfg.SOLVER.MAX_ITER))) for k, _, folder, _ in todo]
    if len(prep.groups) > len(todo):
        what = f"group(s) of {options.gpus_per_trial} GPU(s)" if options.gpus_per_trial else "CPU slot(s)"
        echo(f"note: --parallel-trials {len(prep.groups)} but {len(todo)} trial(s) to run: "
             f"{len(prep.groups) - len(todo)} {what} stay idle")
    with stop_request() as stop, Monitor(book):
        if len(prep.groups) == 1:
            _run_sequential(todo, prep, options, book, echo, stop)
        else:
            _run_parallel(todo, prep, options, book, echo, stop)
    return book.summarize()


def _action(k: int, seed: int, state: TrialState, folder: Path, trials: int) -> str:
    action = "resuming from its last checkpoint" if state is TrialState.INTERRUPTED else "starting"
    return f"trial {k + 1}/{trials} (seed {seed}): {action} in {folder}"


def trial_argv(folder: Path, voc_root: Path, seed: int, gpus: int) -> list[str]:
    """The command of one trial process (`voc_train`); its rendezvous comes in DIST_URL_ENV."""
    return [sys.executable, "-m", "moco_transfer.eval.voc_train", str(folder / "config.yaml"), str(voc_root),
            str(seed), "--gpus", str(gpus)]


def _run_sequential(todo: Sequence[tuple[int, int, Path, TrialState]], prep: Prepared, options: VocOptions,
                    book: RunBook, echo: Callable[[str], None], stop: StopRequest | None = None) -> None:
    """One trial after another. On GPUs each runs in a subprocess (output to this terminal), so that this process
    never holds a CUDA context or cache that a later trial or the re-probe after an OOM would have to share; on
    the CPU in this process, through detectron2's `launch` (sharing `stop`). A stopped trial ends the run."""
    stop = stop or StopRequest()  # none given: never requested
    ports = PortBook()
    for k, seed, folder, state in todo:
        if stop.requested:  # e.g. during the previous trial's evaluation, which then finished
            raise stopped_error(options, [], stop)
        echo(_action(k, seed, state, folder, options.trials))
        book.started(k)
        if options.gpus_per_trial > 0:
            url = ports.take(k) if options.dist_url == "auto" else options.dist_url
            env = {**child_env(os.environ, prep.groups[0], 1), DIST_URL_ENV: url}
            argv = trial_argv(folder, options.voc_root, seed, options.gpus_per_trial)
            code = wait_forwarding(subprocess.Popen(argv, env=env), stop)
            ports.release(k)
            if trial_stopped(code, stop):
                book.finished(k)
                raise stopped_error(options, [k], stop)
            if code == EXIT_OOM or read_oom(folder) is not None:
                book.finished(k)
                raise out_of_memory_error(prep, options, k, echo)
            if code != 0:
                book.finished(k)
                raise TrialFailed(f"trial {k} failed (exit code {code}); see {folder / 'log.txt'}")
        else:
            from detectron2.engine import launch

            try:
                launch(run_trial, 1, dist_url=options.dist_url,
                       args=(str(folder / "config.yaml"), str(options.voc_root), seed))
            except StoppedBySignal:
                book.finished(k)
                raise stopped_error(options, [k], stop) from None
            except Exception as exc:
                if isinstance(exc, TrialOutOfMemory) or read_oom(folder) is not None:
                    book.finished(k)
                    raise out_of_memory_error(prep, options, k, echo) from None
                raise
        if book.finished(k) is None:
            raise TrialFailed(f"trial {k} ended without {folder / 'metrics.json'}; see {folder / 'log.txt'}")


def _run_parallel(todo: Sequence[tuple[int, int, Path, TrialState]], prep: Prepared, options: VocOptions,
                  book: RunBook, echo: Callable[[str], None], stop: StopRequest | None = None) -> None:
    """Each trial a `voc_train` subprocess on its GPU group; output in trial_<k>/console.log. A stopped trial, or a
    signal here (passed on to the running trials), ends the run once the running trials have saved."""
    stop = stop or StopRequest()  # none given: never requested
    from moco_transfer.progress import progress

    by_key = {k: (seed, folder, state) for k, seed, folder, state in todo}
    left = dict(book.plan)
    jobs = [PoolJob(k, trial_argv(folder, options.voc_root, seed, options.gpus_per_trial), folder / "console.log")
            for k, seed, folder, _ in todo]
    ports = PortBook()
    failures: list[tuple[int, int]] = []
    stopped: list[int] = []
    bar = progress(total=sum(left.values()), unit="it", desc=f"{len(todo)} VOC trials, {len(prep.groups)} at a time")

    def on_start(job: PoolJob, group: Sequence[str]) -> dict[str, str]:
        seed, folder, state = by_key[job.key]
        where = f"GPU {','.join(group)}" if group else "CPU"
        echo(f"{_action(job.key, seed, state, folder, options.trials)} on {where} (log: {job.log})")
        book.started(job.key)
        return {DIST_URL_ENV: ports.take(job.key)}

    def on_exit(job: PoolJob, code: int) -> bool:
        ports.release(job.key)
        m = book.finished(job.key)
        if code == 0 and m is not None:
            return True
        if trial_stopped(code, stop):
            stopped.append(job.key)
            echo(f"trial {job.key + 1}/{options.trials}: stopped on a signal after its checkpoint; no new trial "
                 "starts, running ones stop too")
            return False
        failures.append((job.key, code))
        echo(f"trial {job.key + 1}/{options.trials}: its process ended with exit code {code}; no new trial starts, "
             "running ones finish")
        return False

    def on_tick() -> None:
        done = 0
        for k, n in left.items():
            p = read_progress(trial_dir(options.output, k))
            if p:
                done += min(n, max(0, int(p.get("iteration", 0)) - int(p.get("start_iter", 0))))
            elif read_metrics(trial_dir(options.output, k)) is not None:
                done += n
        bar.n = done
        bar.refresh()

    try:
        run_pool(jobs, prep.groups, lambda group: child_env(os.environ, group, len(prep.groups)), on_start, on_exit,
                 on_tick, stop=stop)
    finally:
        bar.close()
    for k, code in failures:
        if code == EXIT_OOM or read_oom(trial_dir(options.output, k)) is not None:
            raise out_of_memory_error(prep, options, k, echo)
    if failures:
        k, code = failures[0]
        log = trial_dir(options.output, k) / "console.log"
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-15:]) if log.is_file() else ""
        raise TrialFailed(f"trial {k} failed (exit code {code}); last lines of {log}:\n{tail}")
    if stopped or (stop.requested and any(read_metrics(folder) is None for _, _, folder, _ in todo)):
        raise stopped_error(options, sorted(stopped), stop)
