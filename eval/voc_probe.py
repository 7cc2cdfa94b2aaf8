"""The memory pre-flight's probe: real training iterations of the trial's model at the largest input, on one GPU.

Each measurement is one forward, backward and optimizer step of the configured model on real training images
resized to the largest padded input the training resize can produce (`voc_memory.probe_image_size`), in the
asked precision (fp16 autocast with a gradient scaler, as detectron2's AMP trainer) and images per GPU, read as
the caching allocator's peak reserved bytes. The decision is `voc_memory.plan_memory`.

It runs as `python -m moco_transfer.eval.voc_probe` in a process of its own, so that all it allocates, its CUDA
context included, is returned before the trials start. The last line of its output is the plan as JSON.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moco_transfer.detectron2_ext import register

from .voc_memory import MemoryPlan, Setting, TrialShape, plan_memory, probe_image_size
from .voc_train import register_voc

RESULT_MARK = "MOCO_PROBE_RESULT "


def probe_inputs(cfg: Any, n: int, size: tuple[int, int]) -> list[dict[str, Any]]:
    """`n` mapped training samples (image tensor and instances) from the first training set, resized to `size`."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T

    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    if not dicts:
        raise RuntimeError(f"training set {cfg.DATASETS.TRAIN[0]} is empty")
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[T.Resize(size)])
    return [mapper(copy.deepcopy(dicts[i % len(dicts)])) for i in range(n)]


class Prober:
    """The trial's model and optimizer on one device; `measure(setting)` is one probe iteration's peak bytes."""

    def __init__(self, cfg: Any, image_size: tuple[int, int], device: str = "cuda") -> None:
        from detectron2.modeling import build_model
        from detectron2.solver import build_optimizer

        c = cfg.clone()
        c.defrost()
        c.MODEL.DEVICE = device
        c.MODEL.WEIGHTS = ""
        self.cfg, self.device, self.image_size = c, torch.device(device), image_size
        self.model = build_model(c)
        self.model.train()
        self.optimizer = build_optimizer(c, self.model)
        self.samples: list[dict[str, Any]] = []

    def step(self, setting: Setting) -> None:
        """One training iteration on `setting.ims_per_gpu` images at the probe size (weights change: a copy)."""
        from detectron2.utils.events import EventStorage

        if len(self.samples) < setting.ims_per_gpu:
            self.samples = probe_inputs(self.cfg, setting.ims_per_gpu, self.image_size)
        batch = self.samples[:setting.ims_per_gpu]
        amp = setting.amp and self.device.type == "cuda"
        scaler = torch.amp.GradScaler(self.device.type, enabled=amp)
        self.optimizer.zero_grad(set_to_none=True)
        with EventStorage(0), torch.autocast(self.device.type, dtype=torch.float16, enabled=amp):
            losses = sum(self.model(batch).values())  # the heads log training statistics to an event storage
        scaler.scale(losses).backward()
        scaler.step(self.optimizer)
        scaler.update()

    def measure(self, setting: Setting) -> int | None:
        """Peak reserved bytes of one iteration, or None when it runs out of memory."""
        self._release()
        torch.cuda.reset_peak_memory_stats(self.device)
        failed = False
        try:
            self.step(setting)
            torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError:
            failed = True
        peak = None if failed else int(torch.cuda.max_memory_reserved(self.device))
        self._release()
        print(f"probe: {setting.describe()}: " + ("out of memory" if failed else f"{peak / 2**30:.1f} GiB"),
              file=sys.stderr, flush=True)
        return peak

    def _release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def image_size_of(cfg: Any) -> tuple[int, int]:
    return probe_image_size(tuple(cfg.INPUT.MIN_SIZE_TRAIN), int(cfg.INPUT.MAX_SIZE_TRAIN),
                            bool(cfg.DATALOADER.ASPECT_RATIO_GROUPING))


def run_probe(cfg_file: str, voc_root: str, shape: TrialShape, failed_at: str | None = None,
              failed_peak: int | None = None) -> MemoryPlan:
    """The plan for `shape`, measured on this process's first CUDA device."""
    from detectron2.config import get_cfg

    register()
    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    register_voc(voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    size = image_size_of(cfg)
    free, total = (int(x) for x in torch.cuda.mem_get_info(0))
    prober = Prober(cfg, size)
    return plan_memory(shape, free, total, prober.measure, failed_peak=failed_peak, failed_at=failed_at,
                       image_size=size, device=torch.cuda.get_device_name(0))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moco_transfer.eval.voc_probe",
                                 description="Memory pre-flight of a VOC trial on the first visible GPU.")
    ap.add_argument("config")
    ap.add_argument("voc_root")
    ap.add_argument("--shape", required=True, help="TrialShape fields as JSON")
    ap.add_argument("--failed-at", default=None)
    ap.add_argument("--failed-peak", type=int, default=None)
    args = ap.parse_args(argv)
    fields = json.loads(args.shape)
    fields["steps"] = tuple(fields["steps"])
    shape = TrialShape(**fields)
    if not torch.cuda.is_available():
        print(RESULT_MARK + json.dumps({"skipped": "no CUDA device visible"}))
        return 0
    plan = run_probe(args.config, str(Path(args.voc_root)), shape, args.failed_at, args.failed_peak)
    print(RESULT_MARK + json.dumps(plan.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
