"""Learning-rate schedules of MoCo, per epoch as in the official code; pretraining and the linear probe share them."""

from __future__ import annotations

import math
from collections.abc import Sequence


def lr_at_epoch(base_lr: float, epoch: int, epochs: int, cos: bool, milestones: Sequence[int]) -> float:
    """Cosine: base * 0.5 * (1 + cos(pi * epoch / epochs)); step: x0.1 at each milestone passed."""
    if cos:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    return base_lr * 0.1 ** sum(epoch >= m for m in milestones)
