"""The MoCo authors' rule for fine-tuning on fewer GPUs than the protocol's 8. No detectron2.

Keep 16 images per batch when they fit (at most `max_ims_per_gpu` per device); otherwise 8 images with
BASE_LR halved and every iteration count doubled (STEPS, MAX_ITER, WARMUP_ITERS, TEST.EVAL_PERIOD,
CHECKPOINT_PERIOD), so the schedule, its warm-up included, sees the same number of images: detectron2's
`DefaultTrainer.auto_scale_workers` rule, rounded as it rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

PROTOCOL_GPUS = 8


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


def scale_to_gpus(ims_per_batch: int, base_lr: float, steps: tuple[int, ...], max_iter: int, num_gpus: int,
                  max_ims_per_gpu: int = 4, warmup_iters: int = 0, eval_period: int = 0, checkpoint_period: int = 0
                  ) -> list[Change]:
    """The config changes the rule asks for on `num_gpus` devices (CPU counts as one; a period 0, off, stays 0)."""
    devices = max(1, num_gpus)
    if devices >= PROTOCOL_GPUS or ims_per_batch <= devices * max_ims_per_gpu:
        return []
    new_ims = ims_per_batch // 2
    scale = new_ims / ims_per_batch
    counts = {"SOLVER.MAX_ITER": max_iter, "SOLVER.WARMUP_ITERS": warmup_iters, "TEST.EVAL_PERIOD": eval_period,
              "SOLVER.CHECKPOINT_PERIOD": checkpoint_period}
    changes = [Change("SOLVER.IMS_PER_BATCH", ims_per_batch, new_ims),
               Change("SOLVER.BASE_LR", base_lr, base_lr * scale),
               Change("SOLVER.STEPS", tuple(steps), tuple(int(round(s / scale)) for s in steps))]
    changes += [Change(key, n, int(round(n / scale))) for key, n in counts.items()]  # as detectron2 computes them
    return [c for c in changes if c.new != c.old]
