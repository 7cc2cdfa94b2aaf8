"""Seeded epoch orders and per-image augmentation seeds, shared by pretraining and the linear probe.

Both resume mid-epoch and must then draw exactly what an uninterrupted run draws: the epoch's order comes from
(seed, epoch) alone, not from how many epochs a loader has run, and each image's random views from (epoch seed,
index) alone, not from which loader worker makes them or what it made before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler


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


class EpochSampler(Sampler):
    """This rank's share (`rank_share`, `pad`ded or full batches only) of the permutation seeded by `set_epoch_seed`:
    unlike a shuffling DataLoader's, it depends on the epoch's seed alone, so a resumed run draws the same epoch;
    `start_at(batch)` skips batches unread, in the next pass only. `keys` yields `(epoch seed, index)` for
    SeededItems, which carries the seed to loader workers started in an earlier epoch."""

    def __init__(self, size: int, batch_size: int, world: int = 1, rank: int = 0, pad: bool = False,
                 keys: bool = False) -> None:
        self.size, self.batch_size, self.world, self.rank = size, batch_size, world, rank
        self.pad, self.keys, self.seed, self.start = pad, keys, 0, 0

    def set_epoch_seed(self, seed: int) -> None:
        self.seed, self.start = seed, 0

    def start_at(self, batch: int) -> None:
        self.start = batch

    def _epoch_items(self) -> int:
        share = -(-self.size // self.world) if self.pad else self.size // self.world
        return share if self.pad else share - share % self.batch_size

    def batches(self) -> int:
        """Batches in the whole epoch, whatever `start_at` says."""
        return -(-self._epoch_items() // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        mine = rank_share(self.size, self.seed, self.world, self.rank, self.pad)
        mine = mine[self.start * self.batch_size:self._epoch_items()]
        return iter([(self.seed, i) for i in mine] if self.keys else mine)

    def __len__(self) -> int:
        return max(self._epoch_items() - self.start * self.batch_size, 0)


class SeededItems(Dataset):
    """Item `(seed, i)`: `dataset[i]` with its random views drawn from that pair alone (see `draw_item`), whichever
    worker makes it and whatever it made before. Other attributes (root, classes, targets) are the dataset's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        return draw_item(self.dataset, *key)
