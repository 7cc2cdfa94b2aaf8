"""Seeded epoch orders and per-image augmentation seeds, shared by pretraining and the linear probe.

Both resume mid-epoch and must then draw exactly what an uninterrupted run draws: the epoch's order comes from
(seed, epoch) alone, not from how many epochs a loader has run, and each image's random views from (epoch seed,
index) alone, not from which loader worker makes them or what it made before.
"""

from __future__ import annotations

from typing import Any

import torch


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def draw_item(dataset: Any, seed: int, index: int) -> Any:
    """`dataset[index]` with torch's global generator seeded from (seed, index) and restored afterwards.

    torchvision's transforms draw from the global generator; forking it keeps the caller's own draws (e.g. the
    key shuffle when the loader runs in the main process) where they were. Only the CPU generator is seeded:
    torch.manual_seed would also queue a seed for every accelerator's generator (0.35 ms an item, which a
    stack trace for lazy CUDA start-up takes) and leave them reseeded after the fork, which restores the CPU's.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed((seed * 1_000_003 + index) % (1 << 63))
        return dataset[index]


def rank_share(size: int, seed: int, world: int = 1, rank: int = 0, pad: bool = False) -> list[int]:
    """This rank's indices of the permutation of range(size) seeded by `seed`: every world-th, from `rank`.

    `pad`: repeat the permutation's head so that every index is used (DistributedSampler's way; a classifier
    should see every image); else drop the tail that does not split evenly (pretraining drops partial batches).
    """
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    order = order + order[:(-size) % world] if pad else order[:size - size % world]
    return order[rank::world]
