"""Does a detection trial fit in GPU memory, and if not, what does? The decision and its message. No detectron2, no GPU.

The numbers come from probe iterations (`probe`): real forward, backward and optimizer steps of the trial's
model at the largest input the training resize can produce (and a smaller one), in a chosen precision and number
of images per GPU, read as the caching allocator's peak reserved memory plus the memory outside it. Memory grows
with the images per GPU and halves roughly with fp16 activations, but the constant part (weights, gradients,
momentum, cuDNN workspaces) and allocator fragmentation make any extrapolation a guess, so every option that is
offered is measured, not scaled.
`measure` is any callable returning the bytes a setting needs, or None when the probe itself ran out of memory.
The free memory is that of the tightest GPU the run uses (`GpuMemory`): every GPU of every trial group is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .gpu_scaling import PROTOCOL_GPUS, scale_to_gpus

GIB = 1024**3
# Caps a process's caching allocator to this fraction of each GPU (torch.cuda.set_per_process_memory_fraction);
# the probe and every trial process honour it, so a run can be held to part of a GPU that others share.
MEMORY_FRACTION_ENV = "MOCO_GPU_MEMORY_FRACTION"
# A GPU whose used memory (read by a process that holds only its fresh CUDA context there, a few hundred MB) is
# above this is named in the messages as busy with other processes.
BUSY_BYTES = 2 * GIB
# Error texts of allocation failures that do not arrive as torch.OutOfMemoryError. cuDNN and cuBLAS report a
# failed workspace or handle allocation through their status codes (e.g. "CUDA error: CUBLAS_STATUS_ALLOC_FAILED
# when calling `cublasCreate(handle)`"), a CUDA runtime call outside the caching allocator as torch.AcceleratorError
# "CUDA error: out of memory", and NCCL as "... unhandled cuda error ... Last error: Cuda failure 'out of memory'"
# (a DistBackendError; its "Cuda failure 1 'invalid argument'" variant is not about memory).
ALLOCATION_MARKERS = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory",
                      "Cuda failure 'out of memory'", "Cuda failure 2 'out of memory'")
# Kept free beyond the probe's need, for what the probe does not see: batches with more ground-truth boxes or
# proposals than the first images, DDP buckets and NCCL buffers (the probe is one process), fragmentation over
# thousands of iterations, other processes starting on the GPU. The probe itself is held against 40 real
# multi-scale iterations by the GPU check (tests/test_cuda_voc.py); this margin is on top of that.
HEADROOM_FRACTION = 0.06
# Measured with `moco eval voc --gpus 1` on one H100 80 GB (torch 2.11, R50-C4, synthetic VOC 400-500 px images),
# keyed by (images per GPU, AMP). The fp32 16-image run died at iteration 14 with 74.7 GB in use. Shown only for
# trials of that model (TrialShape.reference_timings): a COCO Mask R-CNN iteration is another measurement.
REFERENCE_DEVICE = "one H100 80 GB"
REFERENCE_S_PER_ITER: dict[tuple[int, bool], float] = {(16, False): 1.09, (16, True): 0.77, (8, False): 0.50}

Measure = Callable[["Setting"], "int | None"]


def memory_fraction(env: Mapping[str, str] | None = None) -> float | None:
    """The cap of MOCO_GPU_MEMORY_FRACTION (0 < f <= 1), or None when unset."""
    raw = (os.environ if env is None else env).get(MEMORY_FRACTION_ENV)
    if not raw:
        return None
    f = float(raw)
    if not 0 < f <= 1:
        raise ValueError(f"{MEMORY_FRACTION_ENV}={raw}: must be in (0, 1]")
    return f


def apply_memory_fraction(devices: Sequence[int] | None = None) -> float | None:
    """Cap the allocator on `devices` (default: every visible GPU) to MOCO_GPU_MEMORY_FRACTION, if set.

    A trial rank caps only its own device: setting the fraction on a device creates a CUDA context there.
    """
    f = memory_fraction()
    if f is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()) if devices is None else devices:
            torch.cuda.set_per_process_memory_fraction(f, i)
    return f


def allocation_failure(exc: BaseException) -> str | None:
    """Why `exc` means "does not fit" (a GPU allocation failed), or None for any other error.

    torch.OutOfMemoryError is the caching allocator's; the others are RuntimeErrors (AcceleratorError and
    DistBackendError are subclasses) whose text carries a library's allocation status. Checked along the
    exception's cause/context chain, since wrappers re-raise with their own text.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, torch.OutOfMemoryError):
            return "out of memory (caching allocator)"
        if isinstance(exc, RuntimeError):
            text = str(exc)
            for marker in ALLOCATION_MARKERS:
                if marker in text:
                    return f"allocation failed ({marker.removeprefix('CUDA error: ')})"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """True when `exc` is a GPU allocation failure of any library (see `allocation_failure`)."""
    return allocation_failure(exc) is not None


@dataclass
class GpuMemory:
    """One GPU of the run as the probe process found it: its id as given to the run, free and total bytes."""

    id: str
    name: str
    free: int
    total: int
    used: int  # total - free when read, this process's fresh context included

    @property
    def busy(self) -> bool:
        return self.used > BUSY_BYTES

    def usable(self) -> int:
        return max(0, self.free - int(HEADROOM_FRACTION * self.total))

    def busy_line(self) -> str:
        return (f"GPU {self.id} ({self.name}) has {self.used / GIB:.1f} GiB of {self.total / GIB:.1f} GiB in use by "
                "other processes")


def tightest(gpus: Sequence[GpuMemory]) -> GpuMemory:
    """The GPU with the least usable memory: a trial group fits only where its tightest GPU fits."""
    return min(gpus, key=lambda g: (g.usable(), g.free))


@dataclass(frozen=True)
class Setting:
    """What decides a trial's memory per GPU: images per GPU and precision (the input size is the largest)."""

    ims_per_gpu: int
    amp: bool

    def describe(self) -> str:
        return f"{self.ims_per_gpu} image{'s' if self.ims_per_gpu != 1 else ''} per GPU in " + (
            "fp16 (--amp)" if self.amp else "fp32")


@dataclass(frozen=True)
class TrialShape:
    """The trial as configured: solver values, GPUs per trial and the switches the options change."""

    ims_per_batch: int
    base_lr: float
    steps: tuple[int, ...]
    max_iter: int
    gpus: int  # GPUs per trial; 0 = CPU
    amp: bool = False
    max_ims_per_gpu: int = 4
    parallel_trials: int = 1
    visible_gpus: int | None = None
    reference_timings: bool = True  # REFERENCE_S_PER_ITER (VOC R50-C4) applies to this trial's model

    @property
    def devices(self) -> int:
        return max(1, self.gpus)

    @property
    def setting(self) -> Setting:
        return Setting(self.ims_per_batch // self.devices, self.amp)


@dataclass
class Option:
    """A change to the command that may make the trial fit, with its cost."""

    kind: str  # amp, gpus, scale, scale+amp
    flags: str
    setting: Setting
    schedule: str
    resumes: bool  # an interrupted trial continues under it (see docs/voc.md, "what keeps a resume")
    max_iter: int
    peak: int | None = None
    fits: bool | None = None  # None: not measured
    timed: bool = True  # the reference s/iter applies (see TrialShape.reference_timings)

    def line(self, usable: int) -> str:
        if self.fits is None:
            measured = "not measured"
        elif self.peak is None:
            measured = "ran out of memory in the probe"
        else:
            measured = f"needs {self.peak / GIB:.1f} GiB" + ("" if self.fits else f" (> {usable / GIB:.1f} usable)")
        ref = REFERENCE_S_PER_ITER.get((self.setting.ims_per_gpu, self.setting.amp)) if self.timed else None
        if ref is None:
            cost = ""
        elif self.kind == "gpus":  # the reference is one GPU with that many images; several add communication
            cost = (f"; reference {ref:.2f} s/iter for {self.setting.ims_per_gpu} images on {REFERENCE_DEVICE}, so at "
                    f"least {self.max_iter * ref / 3600:.1f} h per trial")
        else:
            cost = f"; reference {ref:.2f} s/iter on {REFERENCE_DEVICE} -> {self.max_iter * ref / 3600:.1f} h per trial"
        return f"  {self.flags}: {self.setting.describe()}, {measured}. {self.schedule}{cost}"


@dataclass
class MemoryPlan:
    """The outcome: fits, or the options with their measurements."""

    setting: Setting
    peak: int | None  # bytes needed by the setting; None: the probe ran out of memory
    free: int | None
    total: int | None
    fits: bool
    where: str = "memory pre-flight"
    image_size: tuple[int, int] | None = None
    device: str = ""
    options: list[Option] = field(default_factory=list)
    in_training: bool = False  # the setting failed during training rather than in the pre-flight probe
    gpus: list[GpuMemory] = field(default_factory=list)  # every GPU the run uses; free/total are the tightest's
    details: list[dict[str, Any]] = field(default_factory=list)  # the probe's readings per measured setting

    def busy_lines(self) -> list[str]:
        return [g.busy_line() for g in self.gpus if g.busy]

    @property
    def usable(self) -> int:
        if self.free is None or self.total is None:
            return 0
        return max(0, self.free - int(HEADROOM_FRACTION * self.total))

    def _where(self) -> str:
        where = self.device or "the GPU"
        if len(self.gpus) > 1:
            low = tightest(self.gpus)
            where = f"GPU {low.id} ({low.name}), the tightest of {len(self.gpus)}"
        return where

    def summary_line(self) -> str:
        """One line for the log when the trial fits."""
        busy = "".join(f"; {line}" for line in self.busy_lines())
        return (f"memory pre-flight: {self.setting.describe()} needs {_gib(self.peak)} GiB at "
                f"{_size(self.image_size)}; {_gib(self.free)} GiB free of {_gib(self.total)} GiB on "
                f"{self._where()} ({HEADROOM_FRACTION:.0%} kept free): fits{busy}")

    def message(self) -> str:
        """The error text: what was tried, what is available, and every option with its cost."""
        if self.in_training:
            need = "ran out of memory" + ("" if self.peak is None else f" with {self.peak / GIB:.1f} GiB reserved")
        elif self.peak is None:
            need = f"ran out of memory in a probe iteration at {_size(self.image_size)}"
        else:
            need = f"needs {self.peak / GIB:.1f} GiB" + (f" at {_size(self.image_size)}" if self.image_size else "")
        have = ("" if self.total is None else
                f"; {_gib(self.free)} GiB free of {_gib(self.total)} GiB on {self._where()}, "
                f"{HEADROOM_FRACTION:.0%} of it kept free, so {self.usable / GIB:.1f} GiB usable")
        lines = [f"{self.where}: the trial does not fit in GPU memory: {self.setting.describe()} {need}{have}."]
        busy = self.busy_lines()
        if busy:
            lines.append("Busy: " + "; ".join(busy) + " (free it, or leave that GPU out with CUDA_VISIBLE_DEVICES).")
        fitting = [o for o in self.options if o.fits]
        unknown = [o for o in self.options if o.fits is None]
        if fitting:
            lines.append("Options that fit (measured by the same probe):")
            lines += [o.line(self.usable) for o in fitting]
        elif unknown:
            lines.append("Options (memory not measured here):")
            lines += [o.line(self.usable) for o in unknown]
        else:
            lines.append("No option fits: a GPU with more memory is needed.")
        too_big = [o for o in self.options if o.fits is False]
        if too_big and (fitting or unknown):
            lines.append("Measured and too big: " + "; ".join(f"{o.flags} ({o.setting.describe()})" for o in too_big))
        lines.append("--amp and more GPUs keep the schedule, so interrupted trials resume; --scale-to-gpus changes "
                     "it, which an output folder accepts only while no trial has a checkpoint or result (else add "
                     "--fresh or choose another --output; docs/voc.md, 'What keeps a resume').")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["usable"] = self.usable
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MemoryPlan:
        d = dict(d)
        d.pop("usable", None)
        d["setting"] = Setting(**d["setting"])
        d["image_size"] = tuple(d["image_size"]) if d.get("image_size") else None
        d["options"] = [Option(**{**o, "setting": Setting(**o["setting"])}) for o in d.get("options", [])]
        d["gpus"] = [GpuMemory(**g) for g in d.get("gpus", [])]
        return cls(**d)


def _gib(x: int | None) -> str:
    return "?" if x is None else f"{x / GIB:.1f}"


def _size(hw: tuple[int, int] | None) -> str:
    return "the largest training size" if hw is None else f"{hw[0]}x{hw[1]} px"


def probe_image_size(min_size_train: Sequence[int], max_size_train: int, aspect_grouping: bool) -> tuple[int, int]:
    """The largest padded input (height, width) a training batch can have under ResizeShortestEdge.

    The short side is at most max(MIN_SIZE_TRAIN) and the long side at most MAX_SIZE_TRAIN. With aspect-ratio
    grouping every batch is all-landscape (or all-portrait), so it pads to short x long; without it a landscape
    and a portrait image share a batch and pad to long x long.
    """
    short = min(max(min_size_train), max_size_train)
    return (short, max_size_train) if aspect_grouping else (max_size_train, max_size_train)


def probe_sizes(min_size_train: Sequence[int], max_size_train: int, aspect_grouping: bool) -> list[tuple[int, int]]:
    """The probe's input sizes: the largest padded input, then the one of the smallest short side (if another).

    Multi-scale training alternates between them; the caching allocator's blocks cut for one size do not all
    fit the other, so running both shows the fragmentation a single size hides.
    """
    large = probe_image_size(min_size_train, max_size_train, aspect_grouping)
    small = probe_image_size((min(min_size_train),), max_size_train, aspect_grouping)
    return [large] if small == large else [large, small]


def candidate_options(shape: TrialShape) -> list[Option]:
    """The changes that reduce memory per GPU, cheapest first: --amp, more GPUs per trial, --scale-to-gpus."""
    out = _candidate_options(shape)
    for opt in out:
        opt.timed = shape.reference_timings
    return out


def _candidate_options(shape: TrialShape) -> list[Option]:
    g, ims, out = shape.devices, shape.ims_per_batch, []
    unchanged = f"Schedule unchanged ({ims} images per batch, BASE_LR {shape.base_lr:g}, {shape.max_iter} iterations)"
    if not shape.amp:
        out.append(Option("amp", "--amp", Setting(ims // g, True), unchanged + "; BN still sees the whole batch",
                          True, shape.max_iter))
    for more in range(g + 1, ims + 1):
        if ims % more:
            continue
        p = shape.parallel_trials
        flags = f"--gpus {more * p}" + (f" --parallel-trials {p}" if p > 1 else "")
        if p > 1 and shape.visible_gpus and shape.visible_gpus // more >= 1:
            flags += f" (or --parallel-trials {shape.visible_gpus // more} on the {shape.visible_gpus} visible)"
        have = f"; {shape.visible_gpus} visible" if shape.visible_gpus is not None and p == 1 else ""
        out.append(Option("gpus", flags, Setting(ims // more, shape.amp), f"{more} GPUs per trial{have}. " + unchanged,
                          True, shape.max_iter))
    half = ims // 2
    if g < PROTOCOL_GPUS and ims % 2 == 0 and half % g == 0:
        cap = shape.max_ims_per_gpu if ims > g * shape.max_ims_per_gpu else half // g
        changes = scale_to_gpus(ims, shape.base_lr, shape.steps, shape.max_iter, g, cap)
        if changes:
            flags = "--scale-to-gpus" + ("" if cap == shape.max_ims_per_gpu else f" --max-ims-per-gpu {cap}")
            new_iter = int(next(c.new for c in changes if c.key == "SOLVER.MAX_ITER"))
            schedule = "Schedule changes: " + ", ".join(str(c).removeprefix("SOLVER.") for c in changes)
            out.append(Option("scale", flags, Setting(half // g, shape.amp), schedule, False, new_iter))
            if not shape.amp:
                out.append(Option("scale+amp", flags + " --amp", Setting(half // g, True), schedule, False, new_iter))
    return out


def plan_memory(shape: TrialShape, free: int | None, total: int | None, measure: Measure | None, *,
                failed_peak: int | None = None, failed_at: str | None = None, image_size: tuple[int, int] | None = None,
                device: str = "", gpus: Sequence[GpuMemory] = ()) -> MemoryPlan:
    """Decide whether the trial fits; if not, measure the options until the cheapest ones that fit are known.

    Without `failed_at` the configured setting is measured first. With it (an out-of-memory error during
    training) the setting is known not to fit and `failed_peak` is what was in use then. `measure` None (no GPU
    to probe on) lists the options unmeasured. Of the more-GPU options only the smallest count that fits is
    kept; --scale-to-gpus --amp only when --scale-to-gpus alone does not fit. With `gpus` (every GPU of the run)
    `free` and `total` are those of the tightest one.
    """
    if gpus:
        low = tightest(gpus)
        free, total, device = low.free, low.total, device or low.name
    usable = max(0, (free or 0) - int(HEADROOM_FRACTION * (total or 0)))
    results: dict[Setting, int | None] = {}

    def check(opt_setting: Setting) -> tuple[int | None, bool | None]:
        if measure is None:
            return None, None
        if opt_setting not in results:
            results[opt_setting] = measure(opt_setting)
        peak = results[opt_setting]
        return peak, peak is not None and peak <= usable

    plan = MemoryPlan(shape.setting, failed_peak, free, total, False, failed_at or "memory pre-flight", image_size,
                      device, in_training=failed_at is not None, gpus=list(gpus))
    if failed_at is None:
        plan.peak, fits = check(shape.setting)
        plan.fits = bool(fits)
        if plan.fits:
            return plan
    for opt in candidate_options(shape):
        kinds = {o.kind: o for o in plan.options}
        if opt.kind == "gpus" and "gpus" in kinds and (measure is None or kinds["gpus"].fits):
            continue
        if opt.kind == "scale+amp" and measure is not None and kinds.get("scale") and kinds["scale"].fits:
            continue
        opt.peak, opt.fits = check(opt.setting)
        if opt.kind == "gpus" and "gpus" in kinds:
            plan.options.remove(kinds["gpus"])  # an earlier, smaller count that did not fit
        plan.options.append(opt)
    return plan
