"""Pretraining data: two augmented views per image, full batches only, deterministic per epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from moco_transfer import distributed as du
from moco_transfer.augment import TwoCrops, moco_v1_augmentation, moco_v2_augmentation
from moco_transfer.data import DataError, DigitsDataset, ImageFolderDataset, collate_with_skips, resolve_split

from .config import PretrainConfig


def build_pretrain_dataset(cfg: PretrainConfig) -> torch.utils.data.Dataset:
    augmentation = (moco_v2_augmentation if cfg.aug_plus else moco_v1_augmentation)(cfg.image_size, cfg.crop_min)
    if cfg.data is None:
        return DigitsDataset("train", TwoCrops(augmentation), image_size=cfg.image_size)
    return ImageFolderDataset(resolve_split(cfg.data, "train"), TwoCrops(augmentation))


def build_pretrain_loader(cfg: PretrainConfig, dataset: torch.utils.data.Dataset,
                          device: torch.device) -> DataLoader:
    """drop_last keeps every batch full, so K stays a multiple of the batch and the queue wraps exactly."""
    world = du.world_size()
    if cfg.batch_size % world:
        raise DataError(f"--batch-size {cfg.batch_size}: must be divisible by the {world} processes")
    per_rank = cfg.batch_size // world
    if len(dataset) // world < per_rank:
        raise DataError(f"{getattr(dataset, 'root', 'data')}: {len(dataset)} images, fewer than one global batch "
                        f"of {cfg.batch_size}; lower --batch-size")
    if du.is_distributed():
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.seed, drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    return DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=device.type == "cuda", collate_fn=collate_with_skips,
        generator=torch.Generator(), persistent_workers=False,
    )


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make epoch `epoch` draw the same order and augmentations however the run got there (resume)."""
    epoch_seed = seed * 100_003 + epoch
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.sampler.generator.manual_seed(epoch_seed)
    loader.generator.manual_seed(epoch_seed + 7919 * (du.rank() + 1))
    torch.manual_seed(epoch_seed + 104_729 * (du.rank() + 1))
