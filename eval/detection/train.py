"""One detection fine-tuning trial, in every process that trains: the trainer, progress file, out-of-memory capture.

Entry points: `run_trial` (through detectron2's `launch`, in the `moco eval voc|coco` process or spawned per GPU)
and `python -m moco_transfer.eval.detection.train CONFIG DATA_ROOT SEED --gpus N --benchmark voc|coco` (one trial
as a subprocess: every trial on GPUs, and every trial under `--parallel-trials`). The benchmark's spec
(`benchmarks`) registers its datasets at DATA_ROOT and builds its evaluator; the rest is the same for all.
Rank 0 writes the trial folder's progress.json, segments.json and metrics.json; a rank that runs out of GPU
memory writes oom_rank<r>.json, from which the parent builds its message. SIGTERM or SIGUSR1 ends training after
the iteration in progress (every rank at the same one) with a detectron2 checkpoint that `last_checkpoint`
names, so running the trial again resumes from the next iteration; exit code 75. The loader workers drop a stop
signal that their parent did not send (a cluster signals every process of the job), so the trial saves instead of
failing on a dead worker, and they end with the trial.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from moco_transfer.detectron2_ext import register
from moco_transfer.distributed import agree
from moco_transfer.fileio import write_json_atomic
from moco_transfer.signals import EXIT_STOPPED, StoppedBySignal, StopRequest, loader_worker_init, shut_down_workers

from .benchmarks import VOC, Benchmark, get_benchmark
from .memory import allocation_failure, apply_memory_fraction, is_out_of_memory
from .schedule import DIST_URL_ENV
from .trials import OOM_GLOB, PROGRESS_FILE, STOPPED_FILE, write_metrics

SEGMENTS_FILE = "segments.json"
TRAIN_LOG = "train_log.json"  # detectron2's JSON lines of training metrics (its default name clashes with ours)
EXIT_OOM = 3
PROGRESS_PERIOD = 20
WARMUP_ITERS = 20  # iterations not timed: cuDNN autotuning, allocator growth, loader start-up
TIMED_ITERS = 20


class TrialOutOfMemory(RuntimeError):
    """A trial process ran out of GPU memory; its record is in the trial folder (oom_rank<r>.json)."""


_ACTIVE_STOP: StopRequest | None = None


@contextmanager
def stop_request() -> Iterator[StopRequest]:
    """This process's stop request: the one already active (the runner's, or main()'s), else a new one.

    Shared rather than nested, so a signal that arrived before the trial built its trainer (or between two
    in-process trials) still counts: a nested request would take over the handlers and never see it.
    """
    global _ACTIVE_STOP
    if _ACTIVE_STOP is not None:
        yield _ACTIVE_STOP
        return
    with StopRequest() as stop:
        _ACTIVE_STOP = stop
        try:
            yield stop
        finally:
            _ACTIVE_STOP = None


def timing_window(start_iter: int, max_iter: int, warmup: int = WARMUP_ITERS, timed: int = TIMED_ITERS
                  ) -> tuple[int, int]:
    """Iterations [a, b) whose wall time gives s/iter: after `warmup` untimed ones, shrunk for short runs."""
    left = max(0, max_iter - start_iter)
    w = min(warmup, left // 2)
    return start_iter + w, start_iter + w + max(0, min(timed, left - w))


def ims_per_gpu(cfg: Any, world_size: int) -> int:
    return int(cfg.SOLVER.IMS_PER_BATCH) // max(1, world_size)


def _peak_reserved() -> int | None:
    return int(torch.cuda.max_memory_reserved()) if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def start_memory_stats() -> None:
    """At a trial's start: its own peak, not an earlier in-process trial's; the memory cap, if one is set.

    max_memory_reserved is a high-water mark for the life of the process unless reset, and a trial on the CPU or
    through `launch` with one device runs in the calling process, possibly after another trial.
    """
    if torch.cuda.is_available():
        apply_memory_fraction([torch.cuda.current_device()])
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()


def torch_loader(loader: Any, depth: int = 4) -> torch.utils.data.DataLoader | None:
    """The torch DataLoader inside what detectron2's loader builders return: the loader itself, or under its
    aspect-ratio grouping (`.dataset`) and collation (`._dataset`) wrappers."""
    node = loader
    for _ in range(depth):
        if isinstance(node, torch.utils.data.DataLoader):
            return node
        inner = getattr(node, "dataset", None)
        node = inner if inner is not None else getattr(node, "_dataset", None)
        if node is None:
            return None
    return None


def shield_loader_workers(loader: Any) -> Any:
    """`loader` with its workers made to outlive the job's stop signal (`signals.loader_worker_init`), chained
    before the worker_init_fn detectron2 gave them (`worker_init_reset_seed`, which reseeds each worker).

    Slurm, torchrun's agent and GNU timeout signal every process of the job. detectron2's builders take no
    worker_init_fn (they pass their own), so it is set on the built DataLoader before its first iteration.
    """
    inner = torch_loader(loader)
    if inner is None:
        logging.getLogger("detectron2").warning(f"no torch DataLoader found in {type(loader).__name__}: its workers "
                                                "would die on a signal sent to the whole job")
    elif inner.num_workers > 0:
        inner.worker_init_fn = loader_worker_init(then=inner.worker_init_fn)
    return loader


def end_train_loader(trainer: Any) -> None:
    """Stop the training loader's workers with the trial (a stopped trial's would otherwise live on until the
    process exits): detectron2 iterates it through a generator (aspect-ratio grouping) or a DataLoader iterator."""
    batches = getattr(getattr(trainer, "_trainer", trainer), "_data_loader_iter_obj", None)
    if batches is None:
        return
    close = getattr(batches, "close", None)
    if close is not None:  # a generator: closing it drops the DataLoader iterator it holds, whose workers end
        close()
    shut_down_workers(batches)


def trainer_class(stop: StopRequest | None = None, benchmark: Benchmark = VOC) -> type:
    """The detectron2 trainer of a trial (built lazily: detectron2 is optional); `stop` adds the StopHook; the
    benchmark gives the evaluator."""
    from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer
    from detectron2.utils import comm
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter

    class ProgressHook(HookBase):
        """Rank 0: times the iterations after warm-up and keeps progress.json current for the parent."""

        def __init__(self, folder: Path, cfg: Any) -> None:
            self.path = folder / PROGRESS_FILE
            self.cfg = cfg
            self.s_per_iter: float | None = None
            self._t0: float | None = None

        def before_train(self) -> None:
            self.window = timing_window(self.trainer.start_iter, self.trainer.max_iter)
            if self.window[0] == self.window[1]:
                self._write()
            self._t0 = time.perf_counter() if self.window[0] == self.trainer.start_iter else None

        def after_step(self) -> None:
            done = self.trainer.iter + 1  # iterations finished so far
            a, b = self.window
            if done == a:
                self._t0 = time.perf_counter()
            if done == b and self._t0 is not None and b > a:
                self.s_per_iter = (time.perf_counter() - self._t0) / (b - a)
            if done == b or done % PROGRESS_PERIOD == 0 or done >= self.trainer.max_iter:
                self._write()

        def _write(self) -> None:
            world = comm.get_world_size()
            write_json_atomic({"iteration": self.trainer.iter + 1, "start_iter": self.trainer.start_iter,
                               "max_iter": self.trainer.max_iter, "s_per_iter": self.s_per_iter,
                               "window": list(self.window), "amp": bool(self.cfg.SOLVER.AMP.ENABLED), "gpus": world,
                               "ims_per_gpu": ims_per_gpu(self.cfg, world), "peak_memory_bytes": _peak_reserved(),
                               "time": time.time()}, self.path)

    class StopHook(HookBase):
        """Every rank: after each iteration but the last, stop on a signal with a checkpoint resume continues from.

        The ranks agree every iteration with one 4-byte all-reduce: an iteration already all-reduces the
        detector's gradients (tens of millions of values) and gathers its loss figures with a device sync, so a
        flag costs microseconds next to it, and a stop lands within one iteration. The last iteration is left to
        finish: only the evaluation (already run by EvalHook then) would remain, and the trial ends normally.
        """

        def __init__(self, stop: StopRequest) -> None:
            self.stop = stop

        def after_step(self) -> None:
            it = self.trainer.iter
            if it + 1 >= self.trainer.max_iter or not agree([self.stop.requested])[0]:
                return
            name = f"model_{it:07d}"
            self.trainer.checkpointer.save(name, iteration=it)  # rank 0 writes; last_checkpoint names it
            folder = Path(self.trainer.cfg.OUTPUT_DIR)
            why = self.stop.signal_name or "a signal on another rank"
            if comm.is_main_process():
                write_json_atomic({"iteration": it + 1, "max_iter": self.trainer.max_iter, "signal": why,
                                   "checkpoint": f"{name}.pth", "time": time.time()}, folder / STOPPED_FILE)
            comm.synchronize()  # no rank leaves (and ends the process group) before the checkpoint is written
            raise StoppedBySignal(f"stopped by {why} after iteration {it + 1} of {self.trainer.max_iter}; "
                                  f"checkpoint {folder / name}.pth")

    class TrialTrainer(DefaultTrainer):

        @classmethod
        def build_train_loader(cls, cfg: Any) -> Any:
            return shield_loader_workers(super().build_train_loader(cfg))

        @classmethod
        def build_test_loader(cls, cfg: Any, dataset_name: str) -> Any:
            return shield_loader_workers(super().build_test_loader(cfg, dataset_name))

        @classmethod
        def build_evaluator(cls, cfg: Any, dataset_name: str, output_folder: str | None = None) -> Any:
            return benchmark.evaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))

        def build_writers(self) -> list[Any]:
            """Console and JSON lines; TensorBoard events only where tensorboard is installed (not a dependency)."""
            writers = [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, TRAIN_LOG))]
            if importlib.util.find_spec("tensorboard") is not None:
                from detectron2.utils.events import TensorboardXWriter

                writers.append(TensorboardXWriter(self.cfg.OUTPUT_DIR))
            return writers

        def build_hooks(self) -> list[Any]:
            hooks = super().build_hooks()
            if comm.is_main_process():
                hooks.insert(0, ProgressHook(Path(self.cfg.OUTPUT_DIR), self.cfg))
            if stop is not None:
                hooks.append(StopHook(stop))  # last: after the periodic checkpoint and the writers
            return hooks

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """Resume across a precision change: an fp32 checkpoint has no gradient-scaler state for AMP."""
            inner = state_dict["_trainer"]
            if isinstance(self._trainer, AMPTrainer) and "grad_scaler" not in inner:
                logging.getLogger("detectron2").info("resuming an fp32 checkpoint with --amp: the gradient scaler "
                                                     "starts from its initial scale")
                super(DefaultTrainer, self).load_state_dict(state_dict)  # TrainerBase: iteration and hooks
                SimpleTrainer.load_state_dict(self._trainer, inner)
                return
            super().load_state_dict(state_dict)

    return TrialTrainer


class _HideOomTraceback(logging.Filter):
    """Keeps detectron2's 'Exception during training' traceback of an OOM or a stop off the console (log.txt
    keeps it): both end in a message of their own."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not (is_out_of_memory(exc) or isinstance(exc, StoppedBySignal))


def _update_segments(folder: Path, start_iter: int, cfg: Any, world: int) -> list[dict[str, Any]]:
    """Each launch of the trial is a segment; a trial that starts from iteration 0 forgets earlier attempts."""
    path = folder / SEGMENTS_FILE
    segments: list[dict[str, Any]] = []
    if start_iter > 0:
        try:
            segments = [s for s in json.loads(path.read_bytes()) if s.get("start_iter", 0) < start_iter]
        except (FileNotFoundError, ValueError, AttributeError, TypeError):  # ValueError: not JSON or not UTF-8
            segments = []
    segments.append({"start_iter": start_iter, "amp": bool(cfg.SOLVER.AMP.ENABLED), "gpus": world,
                     "ims_per_gpu": ims_per_gpu(cfg, world)})
    write_json_atomic(segments, path)
    return segments


def _oom_record(cfg: Any, rank: int, world: int, iteration: int | None, exc: BaseException) -> dict[str, Any]:
    """What the parent needs for its message; `iteration` is detectron2's 0-based index of the failed one."""
    max_iter = int(cfg.SOLVER.MAX_ITER)
    text = str(exc).strip()
    rec: dict[str, Any] = {
        "rank": rank, "iteration": iteration, "max_iter": max_iter,
        "phase": "training" if iteration is None or iteration < max_iter else "evaluation",
        "amp": bool(cfg.SOLVER.AMP.ENABLED), "gpus": world, "ims_per_gpu": ims_per_gpu(cfg, world),
        "reserved_bytes": _peak_reserved(), "free_bytes": None, "total_bytes": None, "device": "",
        "error": text.splitlines()[0][:300] if text else type(exc).__name__, "kind": allocation_failure(exc),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dev = torch.cuda.current_device()
        rec["device"] = torch.cuda.get_device_name(dev)
        rec["free_bytes"], rec["total_bytes"] = (int(x) for x in torch.cuda.mem_get_info(dev))
    return rec


def run_trial(cfg_file: str, data_root: str, seed: int, benchmark: str = "voc") -> None:
    """Train and evaluate one trial from its saved config; rank 0 writes metrics.json. Entry point of `launch`.

    An out-of-memory error is recorded in oom_rank<r>.json, the memory released, and TrialOutOfMemory raised:
    the trial keeps its last periodic checkpoint, so a re-run with a setting that fits can resume it. A stop
    signal raises StoppedBySignal after the StopHook's checkpoint.
    """
    from detectron2.config import get_cfg
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    register()
    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    cfg.freeze()
    bench = get_benchmark(benchmark)
    bench.register(data_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    rank, world = comm.get_rank(), comm.get_world_size()
    folder = Path(cfg.OUTPUT_DIR)
    logger = setup_logger(distributed_rank=rank, name="detectron2")
    setup_logger(distributed_rank=rank, name="fvcore")
    for h in logger.handlers:
        if not any(isinstance(f, _HideOomTraceback) for f in h.filters):
            h.addFilter(_HideOomTraceback())
    handler = None
    if rank == 0:
        handler = logging.FileHandler(folder / "log.txt")
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    oom: dict[str, Any] | None = None
    trainer = None
    stack = ExitStack()  # the stop request, released with the rest below
    try:
        stop = stack.enter_context(stop_request())
        if rank == 0:
            (folder / STOPPED_FILE).unlink(missing_ok=True)
        seed_all_rng(seed + rank)
        start_memory_stats()
        try:
            trainer = trainer_class(stop, bench)(cfg)
            trainer.resume_or_load(resume=True)
            start_iter = trainer.start_iter
            segments = _update_segments(folder, start_iter, cfg, world) if rank == 0 else []
            trainer.train()
            if hasattr(trainer, "_last_eval_results"):  # set by DefaultTrainer's EvalHook after the last iteration
                results = trainer._last_eval_results
            else:
                results = trainer.test(cfg, trainer.model)
        except Exception as exc:  # cuDNN/cuBLAS/NCCL allocation failures too (memory.allocation_failure)
            if not is_out_of_memory(exc):
                raise
            oom = _oom_record(cfg, rank, world, getattr(trainer, "iter", None), exc)
            logger.error(f"out of GPU memory in {oom['phase']} (rank {rank}): {oom['error']}", exc_info=exc)
        if oom is None:
            if comm.is_main_process():
                write_metrics(folder, bench.record(results), seed, bench, start_iter=start_iter,
                              max_iter=cfg.SOLVER.MAX_ITER,
                              amp=bool(cfg.SOLVER.AMP.ENABLED), gpus=world, ims_per_gpu=ims_per_gpu(cfg, world),
                              segments=segments)
            comm.synchronize()
    finally:
        if trainer is not None:
            end_train_loader(trainer)
        stack.close()
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        trainer = None
        gc.collect()
    if oom is not None:  # outside the except block, so the traceback's frames (and their tensors) are gone
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        write_json_atomic(oom, folder / f"oom_rank{rank}.json")
        raise TrialOutOfMemory(f"trial in {folder} ran out of GPU memory in {oom['phase']} (rank {rank}); "
                               f"see {folder / f'oom_rank{rank}.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """One trial in this process (and its GPU group): exit 0 when done, 3 when out of GPU memory, 75 when stopped
    by a signal (checkpoint saved), 1 otherwise."""
    from detectron2.engine import launch

    ap = argparse.ArgumentParser(prog="python -m moco_transfer.eval.detection.train", description=main.__doc__)
    ap.add_argument("config", help="the trial's config.yaml (OUTPUT_DIR is the trial folder)")
    ap.add_argument("data_root", help="the dataset root (--voc-root, --coco-root)")
    ap.add_argument("seed", type=int)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs of this trial (0 = CPU)")
    ap.add_argument("--benchmark", default="voc", help="whose datasets and evaluator (voc, coco)")
    ap.add_argument("--dist-url", default=os.environ.get(DIST_URL_ENV) or "auto",
                    help=f"rendezvous of the trial's ranks (default: ${DIST_URL_ENV}, set by the parent, else auto)")
    args = ap.parse_args(argv)
    folder = Path(trial_output_dir(args.config))
    print(f"detection.train: {folder} on CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}, "
          f"{args.gpus} GPU(s), rendezvous {args.dist_url}, pid {os.getpid()}", flush=True)
    (folder / STOPPED_FILE).unlink(missing_ok=True)
    # in this process: the trial's request, installed now; spawned ranks: each has its own, this one passes it on
    stopping = stop_request() if args.gpus <= 1 else _ForwardingStop()
    try:
        with stopping:
            launch(run_trial, max(1, args.gpus), dist_url=args.dist_url,
                   args=(args.config, args.data_root, args.seed, args.benchmark))
    except TrialOutOfMemory as exc:
        print(f"out of GPU memory: {exc}", file=sys.stderr)
        return EXIT_OOM
    except StoppedBySignal as exc:
        print(f"detection.train: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except Exception:
        if any(folder.glob(OOM_GLOB)):  # a spawned rank ran out of memory
            print(f"out of GPU memory; see {folder}/oom_rank*.json", file=sys.stderr)
            return EXIT_OOM
        if (folder / STOPPED_FILE).is_file():  # the spawned ranks stopped on a signal after the checkpoint
            print(f"detection.train: stopped on a signal; see {folder / STOPPED_FILE}", file=sys.stderr)
            return EXIT_STOPPED
        raise
    return 0


class _ForwardingStop(StopRequest):
    """The launcher of spawned ranks records a signal and passes it on to them: a user's `kill` of this process
    (or the parent's forwarded SIGTERM) reaches no rank otherwise. A rank that also got it directly (Slurm signals
    every process) records it once."""

    def _handle(self, signum: int, frame: Any) -> None:
        super()._handle(signum, frame)
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except (ProcessLookupError, TypeError):
                pass


def trial_output_dir(cfg_file: str) -> str:
    """OUTPUT_DIR of a saved trial config, read without detectron2's config machinery."""
    import yaml

    with open(cfg_file) as f:
        return str(yaml.safe_load(f).get("OUTPUT_DIR", "."))


if __name__ == "__main__":
    sys.exit(main())
