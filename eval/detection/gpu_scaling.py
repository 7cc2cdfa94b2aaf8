"""The MoCo authors' rule for fine-tuning on fewer GPUs than the protocol's 8. No detectron2.

Keep 16 images per batch when they fit (at most `max_ims_per_gpu` per device); otherwise 8 images with
BASE_LR halved and STEPS and MAX_ITER doubled, so the schedule sees the same number of images.
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
                  max_ims_per_gpu: int = 4) -> list[Change]:
    """The config changes the rule asks for on `num_gpus` devices (CPU counts as one); empty if none."""
    devices = max(1, num_gpus)
    if devices >= PROTOCOL_GPUS or ims_per_batch <= devices * max_ims_per_gpu:
        return []
    new_ims = ims_per_batch // 2
    return [
        Change("SOLVER.IMS_PER_BATCH", ims_per_batch, new_ims),
        Change("SOLVER.BASE_LR", base_lr, base_lr * new_ims / ims_per_batch),
        Change("SOLVER.STEPS", tuple(steps), tuple(s * ims_per_batch // new_ims for s in steps)),
        Change("SOLVER.MAX_ITER", max_iter, max_iter * ims_per_batch // new_ims),
    ]
