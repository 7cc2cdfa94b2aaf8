"""One detection fine-tuning trial, in every process that trains: set-up, records, out-of-memory capture.

Entry points: `run_trial` (through detectron2's `launch`, in the `moco eval voc|coco` process or spawned per GPU)
and `python -m moco_transfer.eval.detection.train CONFIG DATA_ROOT SEED --gpus N --benchmark voc|coco` (one trial
as a subprocess: every trial on GPUs, and every trial under `--parallel-trials`). The benchmark's spec
(`benchmarks`) registers its datasets at DATA_ROOT and builds its evaluator; the rest is the same for all. The
detectron2 trainer and its hooks are in `trainer`, imported only when a trial trains.
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
import json
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch

from moco_transfer.detectron2_ext import register
from moco_transfer.fileio import write_json_atomic
from moco_transfer.signals import EXIT_STOPPED, StoppedBySignal, StopRequest, shut_down_workers

from .benchmarks import get_benchmark
from .memory import allocation_failure, apply_memory_fraction, is_out_of_memory
from .schedule import DIST_URL_ENV
from .trials import OOM_GLOB, STOPPED_FILE, write_metrics

SEGMENTS_FILE = "segments.json"
EXIT_OOM = 3


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


def ims_per_gpu(cfg: Any, world_size: int) -> int:
    """Images per device of a step: what the progress, segment and out-of-memory records report."""
    return int(cfg.SOLVER.IMS_PER_BATCH) // max(1, world_size)


def peak_reserved() -> int | None:
    """This process's peak reserved CUDA memory (None off CUDA), for the progress and out-of-memory records."""
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
        "reserved_bytes": peak_reserved(), "free_bytes": None, "total_bytes": None, "device": "",
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

    from .trainer import TrialTrainer  # detectron2 at its top: imported when a trial trains, never before

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
            trainer = TrialTrainer(cfg, stop, bench)
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
