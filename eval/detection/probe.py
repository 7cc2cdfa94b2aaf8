"""The memory pre-flight's probe: real training iterations of the trial's model, on one GPU, read as training would.

For each setting (images per GPU, precision) the probe
- warms up: it runs iterations at the largest input until the gradient scaler has let one optimizer step through
  (a fresh GradScaler starts at scale 65536 and skips `optimizer.step` while fp16 gradients overflow), and checks
  that the optimizer then holds its state (SGD momentum buffers: the size of the weights again);
- measures one iteration at each probe size (`memory.probe_sizes`: the largest padded input, then the one of
  the smallest short side, then the largest again), keeping the caching allocator's blocks between them as
  training does, and takes the largest peak of reserved bytes;
- adds the memory outside the allocator that the iterations brought (cuDNN/cuBLAS handles, loaded kernels):
  (total - free) - reserved after the steps, minus the same reading before the model was built.
An allocation failure of any library (`memory.allocation_failure`) means "does not fit"; any other error
stops the probe with its message (ProbeError). The decision is `memory.plan_memory`, against the tightest
of every GPU the run uses.

It runs as `python -m moco_transfer.eval.detection.probe` in a process of its own, so that all it allocates, its CUDA
context included, is returned before the trials start. The last line of its output is the plan as JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moco_transfer.detectron2_ext import register

from .benchmarks import get_benchmark
from .memory import (
    GpuMemory,
    MemoryPlan,
    Setting,
    TrialShape,
    allocation_failure,
    apply_memory_fraction,
    memory_fraction,
    plan_memory,
    probe_sizes,
)

RESULT_MARK = "MOCO_PROBE_RESULT "
# Skipped steps the warm-up allows: each halves the scale, 65536 -> 2**-8 after 24; a scaler that still finds
# inf/NaN gradients then has a model that diverges, not a scale to find.
WARMUP_LIMIT = 24


class ProbeError(RuntimeError):
    """The probe failed for a reason other than memory; the message says what happened."""


def probe_inputs(cfg: Any, n: int, size: tuple[int, int]) -> list[dict[str, Any]]:
    """`n` mapped training samples (image tensor and instances) from the first training set, resized to `size`."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T

    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    if not dicts:
        raise ProbeError(f"training set {cfg.DATASETS.TRAIN[0]} is empty")
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[T.Resize(size)])
    return [mapper(copy.deepcopy(dicts[i % len(dicts)])) for i in range(n)]


def has_momentum_state(optimizer: torch.optim.Optimizer) -> bool:
    """False when the optimizer should hold state (SGD with momentum) but holds none: no real step happened."""
    if not any(group.get("momentum", 0) for group in optimizer.param_groups):
        return True
    return any(state for state in optimizer.state.values())


def warm_up(step: Callable[[], None], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            limit: int = WARMUP_LIMIT) -> int:
    """Run `step` until the scaler let `optimizer.step` run; returns how many steps that took.

    `scaler.update()` lowers the scale exactly when the step was skipped for inf/NaN gradients, so an unchanged or
    higher scale means the optimizer stepped (torch has no public flag for it: pytorch/pytorch#67590). Raises
    ProbeError when no step went through within `limit` or the optimizer holds no state afterwards.
    """
    steps = 0
    while steps < limit:
        before = scaler.get_scale() if scaler.is_enabled() else None
        step()
        steps += 1
        if before is None or scaler.get_scale() >= before:
            break
    else:
        raise ProbeError(f"the gradient scaler skipped all {limit} warm-up steps (inf/NaN gradients every time, "
                         f"scale now {scaler.get_scale():g}): the model diverges at this setting")
    if not has_momentum_state(optimizer):
        raise ProbeError("the optimizer holds no momentum state after the warm-up: the probe would undercount")
    return steps


class Prober:
    """The trial's model and optimizer on one device; `measure(setting)` is what a setting needs, in bytes."""

    def __init__(self, cfg: Any, sizes: Sequence[tuple[int, int]], device: str = "cuda") -> None:
        from detectron2.modeling import build_model
        from detectron2.solver import build_optimizer

        c = cfg.clone()
        c.defrost()
        c.MODEL.DEVICE = device
        c.MODEL.WEIGHTS = ""
        self.cfg, self.device, self.sizes = c, torch.device(device), list(sizes)
        self.baseline = self._outside()  # before the model: this process's context (and other processes)
        self.model = build_model(c)
        self.model.train()
        self.optimizer = build_optimizer(c, self.model)
        self.scalers: dict[Setting, torch.amp.GradScaler] = {}
        self.samples: dict[tuple[int, int], list[dict[str, Any]]] = {}
        self.details: list[dict[str, Any]] = []

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def scaler(self, setting: Setting) -> torch.amp.GradScaler:
        """One scaler per setting for the probe's life, as detectron2's AMPTrainer keeps one for the trial."""
        if setting not in self.scalers:
            self.scalers[setting] = torch.amp.GradScaler(self.device.type, enabled=setting.amp and self.cuda)
        return self.scalers[setting]

    def step(self, setting: Setting, size: tuple[int, int] | None = None) -> None:
        """One training iteration on `setting.ims_per_gpu` images at `size` (default: the largest); weights change."""
        from detectron2.utils.events import EventStorage

        size = size or self.sizes[0]
        if len(self.samples.get(size, [])) < setting.ims_per_gpu:
            self.samples[size] = probe_inputs(self.cfg, setting.ims_per_gpu, size)
        batch = self.samples[size][:setting.ims_per_gpu]
        scaler = self.scaler(setting)
        self.optimizer.zero_grad(set_to_none=True)
        with EventStorage(0), torch.autocast(self.device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
            losses = sum(self.model(batch).values())  # the heads log training statistics to an event storage
        scaler.scale(losses).backward()
        scaler.step(self.optimizer)
        scaler.update()

    def measure(self, setting: Setting) -> int | None:
        """Bytes the setting needs (peak reserved + memory outside the allocator), None when allocation failed."""
        self._release()
        record: dict[str, Any] = {"setting": setting.describe(), "ims_per_gpu": setting.ims_per_gpu,
                                  "amp": setting.amp}
        try:
            record["warmup_steps"] = warm_up(lambda: self.step(setting), self.optimizer, self.scaler(setting))
            peaks = []
            for size in [*self.sizes, self.sizes[0]] if len(self.sizes) > 1 else self.sizes:
                self._sync()
                if self.cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)  # the reserved blocks stay: fragmentation counts
                self.step(setting, size)
                self._sync()
                peaks.append(int(torch.cuda.max_memory_reserved(self.device)) if self.cuda else 0)
            outside = max(0, self._outside() - self.baseline)
        except Exception as exc:
            why = allocation_failure(exc)
            if why is None:
                raise ProbeError(f"probe iteration of {setting.describe()} failed: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
            need = None
            record["failed"] = why
        else:
            need = max(peaks) + outside
            record.update(peak_reserved=max(peaks), peaks=peaks, sizes=[list(s) for s in self.sizes],
                          outside=outside, need=need)
        self.details.append(record)
        self._release()
        print(f"probe: {setting.describe()}: " + (f"{record['failed']}" if need is None else
                                                  f"{need / 2**30:.1f} GiB"), file=sys.stderr, flush=True)
        return need

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _outside(self) -> int:
        """Bytes in use on the device that the caching allocator does not hold: (total - free) - reserved."""
        if not self.cuda:
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free) - int(torch.cuda.memory_reserved(self.device))

    def _release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def sizes_of(cfg: Any) -> list[tuple[int, int]]:
    return probe_sizes(tuple(cfg.INPUT.MIN_SIZE_TRAIN), int(cfg.INPUT.MAX_SIZE_TRAIN),
                       bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING))


def image_size_of(cfg: Any) -> tuple[int, int]:
    return sizes_of(cfg)[0]


def read_gpus(ids: Sequence[str]) -> list[GpuMemory]:
    """Free and total memory of every visible GPU (named by `ids`, the run's CUDA_VISIBLE_DEVICES entries).

    cudaMemGetInfo reports the whole device, other processes included (torch.cuda.memory_reserved is this
    process's alone, pytorch#103243). It creates a context on the device it reads (pytorch#103584, #86493: several
    hundred MB that stay until the process ends): harmless here, in a process that exits before training, and the
    reason a GPU is called busy only above memory.BUSY_BYTES. Each read runs under that device's guard (an old
    torch read the current device whatever index was passed, pytorch#76224). Under a memory fraction the allocator
    cannot reserve more than fraction x total (the cap covers only the allocator, pytorch#58466, so counting the
    memory outside it against the capped free memory errs on the safe side).
    """
    f = memory_fraction()
    out = []
    for i in range(torch.cuda.device_count()):
        with torch.cuda.device(i):
            free, total = (int(x) for x in torch.cuda.mem_get_info())
        used = total - free
        if f is not None:
            free = min(free, int(f * total))
        out.append(GpuMemory(ids[i] if i < len(ids) else str(i), torch.cuda.get_device_name(i), free, total, used))
    return out


def run_probe(cfg_file: str, data_root: str, shape: TrialShape, failed_at: str | None = None,
              failed_peak: int | None = None, gpu_ids: Sequence[str] = (), benchmark: str = "voc") -> MemoryPlan:
    """The plan for `shape`: measured on the visible GPU with the most free memory, checked against the tightest."""
    from detectron2.config import get_cfg

    register()
    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    get_benchmark(benchmark).register(data_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    apply_memory_fraction()
    gpus = read_gpus(gpu_ids)
    roomiest = max(range(len(gpus)), key=lambda i: gpus[i].free)
    torch.cuda.set_device(roomiest)
    sizes = sizes_of(cfg)
    prober = Prober(cfg, sizes, device=f"cuda:{roomiest}")
    plan = plan_memory(shape, None, None, prober.measure, failed_peak=failed_peak, failed_at=failed_at,
                       image_size=sizes[0], gpus=gpus)
    plan.details = prober.details
    return plan


def main(argv: Sequence[str] | None = None) -> int:
    """Print the plan as the last line (RESULT_MARK + JSON): a plan, {"skipped": why} or {"error": message}."""
    ap = argparse.ArgumentParser(prog="python -m moco_transfer.eval.detection.probe",
                                 description="Memory pre-flight of a detection trial on the visible GPUs.")
    ap.add_argument("config")
    ap.add_argument("data_root", help="the dataset root (--voc-root, --coco-root)")
    ap.add_argument("--shape", required=True, help="TrialShape fields as JSON")
    ap.add_argument("--failed-at", default=None)
    ap.add_argument("--failed-peak", type=int, default=None)
    ap.add_argument("--gpu-ids", default="", help="the run's names of the visible GPUs, comma-separated")
    ap.add_argument("--benchmark", default="voc", help="whose datasets to register (voc, coco)")
    args = ap.parse_args(argv)
    fields = json.loads(args.shape)
    fields["steps"] = tuple(fields["steps"])
    shape = TrialShape(**fields)
    if not torch.cuda.is_available():
        print(RESULT_MARK + json.dumps({"skipped": "no CUDA device visible"}))
        return 0
    try:
        plan = run_probe(args.config, str(Path(args.data_root)), shape, args.failed_at, args.failed_peak,
                         [x for x in args.gpu_ids.split(",") if x], args.benchmark)
    except Exception as exc:  # reported by the parent as a plain message; the traceback stays on stderr
        import traceback

        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        message = str(exc) if isinstance(exc, ProbeError) else f"{type(exc).__name__}: {first}"
        why = allocation_failure(exc)
        if why is not None:
            message = f"the model does not fit on the GPU before any probe iteration ({why}): {message}"
        print(RESULT_MARK + json.dumps({"error": message}), flush=True)
        return 1
    print(RESULT_MARK + json.dumps(plan.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
