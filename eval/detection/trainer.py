"""The detectron2 trainer of a detection trial and its hooks: progress file, stop on a signal, resume across AMP.

detectron2 is optional, so this module imports it at its top and nothing imports this module until a trial
trains (`train.run_trial`). The loader and timing helpers live here because only the trainer uses them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from moco_transfer.distributed import agree
from moco_transfer.fileio import write_json_atomic
from moco_transfer.signals import StoppedBySignal, StopRequest, loader_worker_init

from .benchmarks import VOC, Benchmark
from .train import ims_per_gpu, peak_reserved
from .trials import PROGRESS_FILE, STOPPED_FILE

TRAIN_LOG = "train_log.json"  # detectron2's JSON lines of training metrics (its default name clashes with ours)
PROGRESS_PERIOD = 20
WARMUP_ITERS = 20  # iterations not timed: cuDNN autotuning, allocator growth, loader start-up
TIMED_ITERS = 20


def timing_window(start_iter: int, max_iter: int, warmup: int = WARMUP_ITERS, timed: int = TIMED_ITERS
                  ) -> tuple[int, int]:
    """Iterations [a, b) whose wall time gives s/iter: after `warmup` untimed ones, shrunk for short runs."""
    left = max(0, max_iter - start_iter)
    w = min(warmup, left // 2)
    return start_iter + w, start_iter + w + max(0, min(timed, left - w))


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
                           "ims_per_gpu": ims_per_gpu(self.cfg, world), "peak_memory_bytes": peak_reserved(),
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
    """detectron2's DefaultTrainer for one trial: signal-proof loader workers, the benchmark's evaluators, the
    progress file (rank 0), the StopHook when `stop` is given, and resume across a precision change."""

    def __init__(self, cfg: Any, stop: StopRequest | None = None, benchmark: Benchmark = VOC) -> None:
        self.stop, self.benchmark = stop, benchmark  # before DefaultTrainer's __init__, which builds the hooks
        super().__init__(cfg)

    @classmethod
    def build_train_loader(cls, cfg: Any) -> Any:
        return shield_loader_workers(super().build_train_loader(cfg))

    @classmethod
    def build_test_loader(cls, cfg: Any, dataset_name: str) -> Any:
        return shield_loader_workers(super().build_test_loader(cfg, dataset_name))

    def test(self, cfg: Any, model: Any, evaluators: Any = None) -> Any:
        """DefaultTrainer.test with this trial's benchmark evaluators (in cfg.OUTPUT_DIR/inference), also for the
        EvalHook; an instance method, since the benchmark is the trial's, not the class's."""
        if evaluators is None:
            evaluators = [self.benchmark.evaluator(name, os.path.join(cfg.OUTPUT_DIR, "inference"))
                          for name in cfg.DATASETS.TEST]
        return super().test(cfg, model, evaluators)

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
        if self.stop is not None:
            hooks.append(StopHook(self.stop))  # last: after the periodic checkpoint and the writers
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
