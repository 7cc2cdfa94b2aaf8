"""The cached linear probe's per-rank batches: equal step counts on every rank, and epoch orders that do not
repeat across seeds. A rank with one batch fewer leaves the others waiting in DDP's all-reduce (a hang under
torchrun); an order that seed s+1 draws one epoch earlier than seed s makes two "independent" seeds correlated."""

from __future__ import annotations

import pytest
import torch

from moco_transfer import distributed as du
from moco_transfer.eval.linear import TensorSource


def source(size: int, batch: int, seed: int = 0, world: int | None = None, rank: int | None = None) -> TensorSource:
    """Features that name their own index, so a batch tells which samples it holds."""
    feats = torch.arange(size, dtype=torch.float32).view(-1, 1)
    return TensorSource(feats, torch.zeros(size, dtype=torch.long), feats[:3], torch.zeros(3, dtype=torch.long),
                        batch, seed, world=world, rank=rank)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [13, 37, 50])
@pytest.mark.parametrize("batch", [4, 6, 16, 0])  # 0: one full batch
def test_every_rank_runs_len_batches_and_together_they_cover_every_sample(world: int, size: int, batch: int) -> None:
    seen: list[int] = []
    for rank in range(world):
        src = source(size, batch, seed=3, world=world, rank=rank)
        for epoch in (0, 1):
            batches = list(src.train_batches(epoch))
            assert len(batches) == len(src), (world, rank, size, batch, epoch)
            if epoch == 0:
                seen += [int(i) for feats, _ in batches for i in feats.view(-1)]
    assert set(seen) == set(range(size))  # padding repeats a few samples, drops none
    assert len(seen) == world * -(-size // world)


def test_ranks_default_to_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(du, "world_size", lambda: 4)
    counts = []
    for rank in range(4):
        monkeypatch.setattr(du, "rank", lambda rank=rank: rank)
        src = source(13, 4)
        counts.append((len(list(src.train_batches(0))), len(src)))
    assert counts == [(4, 4)] * 4


def test_seed_and_epoch_do_not_trade_places() -> None:
    for seed, epoch in ((0, 1), (5, 3), (1, 10)):
        here = list(source(64, 8, seed=seed).train_batches(epoch))
        there = list(source(64, 8, seed=seed + 1).train_batches(epoch - 1))
        assert not all(torch.equal(a[0], b[0]) for a, b in zip(here, there, strict=True)), (seed, epoch)
    again = list(source(64, 8, seed=5).train_batches(3))  # the order itself is reproducible
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, list(source(64, 8, seed=5).train_batches(3)),
                                                       strict=True))
