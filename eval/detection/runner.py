"""`moco eval voc` and `moco eval coco`: fine-tune a MoCo backbone with detectron2, N trials, and summarise.

One runner for every benchmark; what differs (configs, dataset layout and registration, evaluator, metrics) is
the benchmark's spec (`benchmarks`). Everything that can fail is checked before the first iteration: detectron2
importable, the config valid, the dataset files complete, the GPUs present, the converted backbone loading into
every pretrained tensor of the built model (no silent partial load), the output folder's earlier trials
compatible (same checkpoint, training target, data and base seed), and, on GPUs, the memory: probe iterations
at the largest input (`probe`, decided by `memory`). Without --output the folder names the checkpoint's hash
(`default_output`). Each trial runs in `trial_<k>/` with seed base+k, through detectron2's `launch` (one process
per GPU, or in this process on the CPU), one after another or, with --parallel-trials, several at once as
subprocesses on their own GPU groups (`schedule`). A finished trial (metrics.json present) is skipped; an
interrupted one resumes from its last checkpoint. SIGTERM or SIGUSR1 stops the run: running trials save a
detectron2 checkpoint (a signal that reaches only this process is passed on to them), no further trial starts,
and the command exits 75 (RunStopped); the same command then resumes.

The package: `benchmarks` (the specs), `layouts` (dataset layouts and registration), `prepare` (config,
fingerprint, weights), `trials` (run.json, trial states, metrics, summaries), `train` (the trial process),
`memory` and `probe` (the memory pre-flight), `schedule` (GPU groups, the trial pool, ports, projected time),
`gpu_scaling` (the fewer-GPU rule), `errors` (what is reported as a message).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moco_transfer.checkpoint import CheckpointError
from moco_transfer.fileio import sha256_file, write_json_atomic
from moco_transfer.signals import StoppedBySignal, StopRequest

from .benchmarks import VOC, Benchmark, Layout
from .errors import REPORTED_ERRORS, SETUP_ERRORS, DoesNotFit, RunStopped, SetupError, TrialFailed
from .memory import MemoryPlan, TrialShape, plan_memory
from .prepare import EXECUTION_KEYS, build_config, check_weights, prepare_weights, run_fingerprint
from .schedule import (
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
from .train import EXIT_OOM, TrialOutOfMemory, run_trial, stop_request
from .trials import (
    RUN_FILE,
    STOPPED_FILE,
    Monitor,
    RunBook,
    RunCheck,
    RunMismatch,
    TrialState,
    clear_trial_records,
    inspect_run,
    mismatch_message,
    read_json_record,
    read_metrics,
    read_oom,
    read_progress,
    supersede,
    trial_dir,
    trial_seed,
)

__all__ = ["REPORTED_ERRORS", "SETUP_ERRORS", "DetectionOptions", "RunStopped", "preflight", "run_detection"]


def stopped_error(options: DetectionOptions, stopped: Sequence[int], stop: StopRequest) -> RunStopped:
    """The message for a stopped run: each stopped trial, its signal and iteration, from its stopped.json."""
    parts = []
    for k in stopped:
        folder = trial_dir(options.output, k)
        rec = read_json_record(folder / STOPPED_FILE)
        rec = rec if isinstance(rec, dict) else {}
        why = rec.get("signal") or stop.signal_name or "a signal"
        where = (f"after iteration {rec['iteration']} of {rec['max_iter']} (checkpoint {folder / rec['checkpoint']})"
                 if "checkpoint" in rec else f"(resumes from {folder}'s last checkpoint, if any)")
        parts.append(f"trial {k + 1}/{options.trials} (seed {trial_seed(options.seed, k)}) stopped by {why} {where}")
    if not parts:
        parts.append(f"stopped by {stop.signal_name or 'a signal'} between trials")
    return RunStopped("; ".join(parts) + ". No further trial started; run the same command again to resume.")


@dataclass
class DetectionOptions:
    checkpoint: Path
    data_root: Path  # --voc-root, --coco-root
    output: Path | None = None  # None: `default_output`, chosen by the pre-flight once the checkpoint is hashed
    benchmark: Benchmark = VOC
    trials: int | None = None  # None: the benchmark's default (VOC 5, COCO 1)
    gpus: int | None = None  # None: every visible CUDA device, else CPU (0)
    config: str | None = None  # None: the benchmark's default; a choice, a shipped file name or a YAML path
    opts: Sequence[str] = field(default_factory=list)
    seed: int = 0
    scale_to_gpus: bool = False
    max_ims_per_gpu: int = 4
    dist_url: str = "auto"
    amp: bool = False
    parallel_trials: int = 1
    fresh: bool = False

    def __post_init__(self) -> None:
        if self.trials is None:
            self.trials = self.benchmark.default_trials
        if self.config is None:
            self.config = self.benchmark.default_config

    @property
    def gpus_per_trial(self) -> int:
        return (self.gpus or 0) // max(1, self.parallel_trials)


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
    states: dict[int, TrialState] = field(default_factory=dict)  # taken once at start-up; absent = NEW

    def state(self, k: int) -> TrialState:
        return self.states.get(k, TrialState.NEW)


def _trial_shape(cfg: Any, options: DetectionOptions, visible: int) -> TrialShape:
    s = cfg.SOLVER
    return TrialShape(int(s.IMS_PER_BATCH), float(s.BASE_LR), tuple(int(x) for x in s.STEPS), int(s.MAX_ITER),
                      options.gpus_per_trial, bool(s.AMP.ENABLED), options.max_ims_per_gpu,
                      options.parallel_trials, visible, reference_timings=options.benchmark is VOC)


def _check_datasets(cfg: Any, options: DetectionOptions, echo: Callable[[str], None]) -> Layout:
    """Every file of the config's datasets at the root (the benchmark's check), and a classifier that fits them."""
    bm = options.benchmark
    layout = bm.check_layout(options.data_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    echo(f"{bm.name.upper()} datasets: "
         + (", ".join(f"{bm.dataset_name(n)} ({c} images)" for n, c in layout.counts.items())
            or f"none under {bm.root_option} (the config's datasets are left to detectron2's own registrations)"))
    classes = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    if layout.classes is not None and layout.classes != classes:
        raise SetupError(f"{bm.root_option} {options.data_root}: the annotation files have {layout.classes} "
                         f"categories but the config's MODEL.ROI_HEADS.NUM_CLASSES is {classes} (set it with "
                         f"--opts MODEL.ROI_HEADS.NUM_CLASSES {layout.classes})")
    return layout


# --- the output folder --------------------------------------------------------------------------------------


def _name_part(text: str) -> str:
    """`text` as part of a folder name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def legacy_default_output(benchmark: Benchmark, checkpoint: Path) -> Path:
    """The default folder before it named the checkpoint's content: runs/<benchmark>/<checkpoint file stem>."""
    return Path("runs") / benchmark.name / checkpoint.name.split(".")[0]


def default_output(benchmark: Benchmark, checkpoint: Path, checkpoint_sha256: str, config: str | None = None,
                   opts: Sequence[str] = (), seed: int = 0) -> Path:
    """runs/<benchmark>/<checkpoint stem>-<sha256[:8]>[-<config>][-opts<hash>][-seed<N>]: one folder per run that
    differs in what its trials are.

    Every 200-epoch pretraining run ends in checkpoint_0199.pth.tar, so the stem alone sent every run's trials to
    one folder, where the re-run check refused the second and --fresh moved the first's results out of the
    report's way. The content hash tells the checkpoints apart; a config other than the benchmark's default (its
    --config choice, else the YAML file's stem), --opts that change the training target (a hash of them; not
    execution settings such as DATALOADER.NUM_WORKERS) and a base seed other than 0 are named too, so that such a
    run gets a folder of its own instead of a refusal. GPUs, --amp, --parallel-trials and --scale-to-gpus are not
    in the name: a re-run with other hardware finds (and resumes, or is told why it cannot) the same folder.
    """
    parts = [_name_part(checkpoint.name.split(".")[0]), checkpoint_sha256[:8]]
    config = config or benchmark.default_config
    shipped = benchmark.config_file(config)
    if shipped != benchmark.config_file(benchmark.default_config):
        choice = next((name for name, file in benchmark.configs.items() if file in (shipped, Path(shipped).name)),
                      None)
        parts.append(_name_part(choice or Path(config).name.split(".")[0]))
    pairs = list(zip(opts[::2], opts[1::2], strict=False))
    target = [[str(k), str(v)] for k, v in pairs if k not in EXECUTION_KEYS]
    if target:
        parts.append("opts" + hashlib.sha256(json.dumps(target).encode()).hexdigest()[:6])
    if seed:
        parts.append(f"seed{seed}")
    return Path("runs") / benchmark.name / "-".join(parts)


def choose_output(options: DetectionOptions, checkpoint_sha256: str, fingerprint: dict[str, Any],
                  echo: Callable[[str], None]) -> Path:
    """The output folder: --output, else `default_output`; but a run whose trials are in the old default folder
    (`legacy_default_output`, same fingerprint, some progress) continues there rather than starting over."""
    if options.output is not None:
        return options.output
    new = default_output(options.benchmark, options.checkpoint, checkpoint_sha256, options.config, options.opts,
                         options.seed)
    legacy = legacy_default_output(options.benchmark, options.checkpoint)
    if not new.exists() and (legacy / RUN_FILE).is_file():
        try:
            check = inspect_run(legacy, fingerprint, options.benchmark)
        except RunMismatch:
            check = None
        if check is not None and check.has_progress and not check.differences:
            echo(f"output: {legacy}, whose trials ran with this checkpoint and these settings (the default folder "
                 f"before it was named {new.name}); pass --output to choose another")
            return legacy
    echo(f"output: {new}")
    return new


def preflight(options: DetectionOptions, echo: Callable[[str], None] = print) -> Prepared:
    """All checks that need no training; the output folder's run.json is (re)written only when all pass.

    run.json and the trial folders are read once here (`inspect_run`); the states found serve the memory
    pre-flight and the run itself.
    """
    if options.gpus is None:
        options.gpus = torch.cuda.device_count()
    if options.trials < 1:
        raise SetupError(f"--trials must be at least 1, got {options.trials}")
    if options.gpus < 0:
        raise SetupError(f"--gpus must be >= 0 (0 = CPU), got {options.gpus}")
    visible = visible_devices(os.environ, torch.cuda.device_count())
    try:
        groups = gpu_groups(visible, options.gpus, options.parallel_trials)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    cfg = build_config(options, echo)
    devices = max(1, options.gpus_per_trial)
    if cfg.SOLVER.IMS_PER_BATCH % devices:
        raise SetupError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by {devices} GPUs "
                         "per trial")
    layout = _check_datasets(cfg, options, echo)
    if not options.checkpoint.is_file():
        raise SetupError(f"checkpoint {options.checkpoint}: file not found")
    sha = sha256_file(options.checkpoint)
    fingerprint = run_fingerprint(cfg, sha, options.data_root, options.seed, layout.datasets())
    options.output = choose_output(options, sha, fingerprint, echo)
    options.output.mkdir(parents=True, exist_ok=True)
    check = inspect_run(options.output, fingerprint, options.benchmark)
    if check.differences and check.has_progress and not options.fresh:
        raise RunMismatch(mismatch_message(options.output, check))
    if check.moved and not options.fresh:
        echo(f"{options.output}: {check.moved}; its trials continue")
    try:
        weights_path, weights = prepare_weights(options.checkpoint, options.output,
                                                reuse=check.recorded and check.same_checkpoint, echo=echo)
    except CheckpointError as exc:
        raise SetupError(str(exc)) from exc
    options.benchmark.register(options.data_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    counts = check_weights(cfg, weights_path, weights)
    echo(f"weights {weights_path}: all {counts['backbone_tensors']} {counts['what']} tensors load into the model; "
         f"{counts['new']} start from their default init")
    prep = Prepared(cfg, weights_path, fingerprint, groups, _trial_shape(cfg, options, len(visible)),
                    states={} if options.fresh else dict(check.states))  # --fresh moves the trials away below
    prep.memory = memory_preflight(prep, options, echo)
    # recorded only once everything above passed
    if options.fresh and (moved := supersede(options.output)) is not None:
        echo(f"--fresh: earlier trials and records moved to {moved}")
    elif check.differences:
        echo(f"{options.output}: earlier settings differ ({'; '.join(check.differences)}) but no trial has a "
             "checkpoint or result yet: recording this run's settings")
    _record_run(options, prep, check, fresh=options.fresh or bool(check.differences))
    cfg.MODEL.WEIGHTS = str(weights_path.resolve())
    return prep


def _record_run(options: DetectionOptions, prep: Prepared, check: RunCheck, fresh: bool) -> None:
    """run.json: the fingerprint, this invocation's execution settings and memory check, one history entry; on top
    of the record `inspect_run` read (nothing of it when starting afresh)."""
    old = {} if fresh else check.record
    execution = {"amp": bool(prep.cfg.SOLVER.AMP.ENABLED), "gpus": options.gpus,
                 "gpus_per_trial": options.gpus_per_trial, "parallel_trials": options.parallel_trials,
                 "ims_per_gpu": prep.shape.setting.ims_per_gpu,
                 "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    history = [*(old.get("history") or []), execution]
    record = {**old, "benchmark": options.benchmark.name, **prep.fingerprint, "execution": execution,
              "history": history, "memory": prep.memory.to_json() if prep.memory else None}
    write_json_atomic(record, options.output / RUN_FILE)


def run_gpus(groups: Sequence[Sequence[str]]) -> list[str]:
    """Every GPU the run uses, each once, in order: what the memory pre-flight reads."""
    return list(dict.fromkeys(d for group in groups for d in group))


def probe_argv(cfg_file: Path, data_root: Path, shape: TrialShape, gpu_ids: Sequence[str],
               failed_at: str | None = None, failed_peak: int | None = None, benchmark: str = "voc") -> list[str]:
    """The command of the probe process (`detection.probe`)."""
    cmd = [sys.executable, "-m", "moco_transfer.eval.detection.probe", str(cfg_file), str(data_root),
           "--shape", json.dumps(asdict(shape)), "--gpu-ids", ",".join(gpu_ids), "--benchmark", benchmark]
    if failed_at is not None:
        cmd += ["--failed-at", failed_at] + ([] if failed_peak is None else ["--failed-peak", str(failed_peak)])
    return cmd


def _probe_plan(prep: Prepared, options: DetectionOptions, echo: Callable[[str], None],
                failed_at: str | None = None, failed_peak: int | None = None) -> MemoryPlan | None:
    """Run `detection.probe` in a fresh process that sees every GPU of the run; None if it could not run.

    A fresh process, also for the re-probe after a training OOM: the trial processes have ended by then and this
    process never holds a CUDA context (GPU trials run in subprocesses), so the free memory read is the GPUs'.
    A probe that fails for a reason other than memory raises SetupError with its message.
    """
    cfg_file = options.output / "probe_config.yaml"
    cfg_file.write_text(prep.cfg.dump())
    gpus = run_gpus(prep.groups)
    cmd = probe_argv(cfg_file, options.data_root, prep.shape, gpus, failed_at, failed_peak, options.benchmark.name)
    echo(f"memory pre-flight: probe iterations at the largest training size on GPU {', '.join(gpus)} ...")
    try:
        proc = subprocess.run(cmd, env=child_env(os.environ, gpus, 1), capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        echo("warning: memory probe timed out after 30 min; continuing without it")
        return None
    finally:
        cfg_file.unlink(missing_ok=True)
    from .probe import RESULT_MARK

    result = next((json.loads(line[len(RESULT_MARK):]) for line in reversed(proc.stdout.splitlines())
                   if line.startswith(RESULT_MARK)), None)
    if result is not None and "error" in result:
        raise SetupError(f"memory pre-flight: the probe failed on GPU {', '.join(gpus)}: {result['error']}")
    if result is None or "skipped" in result:
        why = result["skipped"] if result else "\n".join((proc.stderr or "").strip().splitlines()[-8:])
        echo(f"warning: memory probe could not run ({why}); continuing without it")
        return None
    return MemoryPlan.from_json(result)


def memory_preflight(prep: Prepared, options: DetectionOptions, echo: Callable[[str], None]) -> MemoryPlan | None:
    """On GPUs: does a trial fit? Raises DoesNotFit with the options that do. On CPU: skipped."""
    if options.gpus_per_trial == 0:
        echo("memory pre-flight: skipped on the CPU (it measures GPU memory)")
        return None
    if all(prep.state(k) is TrialState.FINISHED for k in range(options.trials)):
        echo("memory pre-flight: skipped, every trial is finished")
        return None
    plan = _probe_plan(prep, options, echo)
    if plan is None:
        return None
    if not plan.fits:
        raise DoesNotFit(plan.message())
    echo(plan.summary_line())
    return plan


def out_of_memory_error(prep: Prepared, options: DetectionOptions, k: int, echo: Callable[[str], None]
                        ) -> DoesNotFit:
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
    return DoesNotFit(f"{plan.message()}\n{keep}")


def run_detection(options: DetectionOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Pre-flight, then every unfinished trial (in order, or --parallel-trials at once); summary after each."""
    prep = preflight(options, echo)  # first: it reports a missing detectron2 with instructions
    cfg, bm = prep.cfg, options.benchmark
    info = {"checkpoint": str(options.checkpoint), "weights": str(prep.weights_path), "config": str(options.config),
            "opts": list(options.opts)}
    book = RunBook(options.output, options.trials, info, echo, parallel=len(prep.groups), benchmark=bm)
    summary = book.summarize()
    todo: list[tuple[int, int, Path, TrialState]] = []
    for k in range(options.trials):
        folder = trial_dir(options.output, k)
        state = prep.state(k)
        seed = trial_seed(options.seed, k)
        if state is TrialState.FINISHED:
            m = read_metrics(folder, bm) or {}
            echo(f"trial {k + 1}/{options.trials} (seed {seed}): finished earlier ({bm.format(m)}), skipped")
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


def trial_argv(folder: Path, data_root: Path, seed: int, gpus: int, benchmark: str = "voc") -> list[str]:
    """The command of one trial process (`detection.train`); its rendezvous comes in DIST_URL_ENV."""
    return [sys.executable, "-m", "moco_transfer.eval.detection.train", str(folder / "config.yaml"), str(data_root),
            str(seed), "--gpus", str(gpus), "--benchmark", benchmark]


def _run_sequential(todo: Sequence[tuple[int, int, Path, TrialState]], prep: Prepared, options: DetectionOptions,
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
            argv = trial_argv(folder, options.data_root, seed, options.gpus_per_trial, options.benchmark.name)
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
                       args=(str(folder / "config.yaml"), str(options.data_root), seed, options.benchmark.name))
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


def _run_parallel(todo: Sequence[tuple[int, int, Path, TrialState]], prep: Prepared, options: DetectionOptions,
                  book: RunBook, echo: Callable[[str], None], stop: StopRequest | None = None) -> None:
    """Each trial a `detection.train` subprocess on its GPU group; output in trial_<k>/console.log. A stopped trial,
    or a signal here (passed on to the running trials), ends the run once the running trials have saved."""
    stop = stop or StopRequest()  # none given: never requested
    from moco_transfer.progress import progress

    by_key = {k: (seed, folder, state) for k, seed, folder, state in todo}
    left = dict(book.plan)
    jobs = [PoolJob(k, trial_argv(folder, options.data_root, seed, options.gpus_per_trial, options.benchmark.name),
                    folder / "console.log") for k, seed, folder, _ in todo]
    ports = PortBook()
    failures: list[tuple[int, int]] = []
    stopped: list[int] = []
    what = f"{len(todo)} {options.benchmark.name.upper()} trials, {len(prep.groups)} at a time"
    bar = progress(total=sum(left.values()), unit="it", desc=what)

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
            elif read_metrics(trial_dir(options.output, k), options.benchmark) is not None:
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
    if stopped or (stop.requested and any(read_metrics(folder, options.benchmark) is None
                                          for _, _, folder, _ in todo)):
        raise stopped_error(options, sorted(stopped), stop)
