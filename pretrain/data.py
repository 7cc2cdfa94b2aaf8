"""Pretraining data: two augmented views per image, full batches only, deterministic per epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from moco_transfer import distributed as du
from moco_transfer.augment import TwoCrops, moco_v1_augmentation, moco_v2_augmentation
from moco_transfer.data import (
    DataError,
    ImageFolderDataset,
    collate_with_skips,
    embedded_dataset,
    embedded_name,
    resolve_split,
)

from .config import PretrainConfig
from .gpu_pipeline import DevicePipeline, ImageBytesDataset, TensorImages, collate_raw, resolve_pipeline, training_dtype


def build_pretrain_dataset(cfg: PretrainConfig, device: torch.device | None = None) -> torch.utils.data.Dataset:
    """Augmented view pairs (CPU pipeline), or undecoded bytes / uint8 images for the device pipeline."""
    embedded = embedded_name(cfg.data)
    if resolve_pipeline(cfg, device or torch.device("cpu")) == "gpu":
        if embedded is not None:
            return TensorImages(embedded_dataset(embedded, "pretrain", None, cfg.image_size))
        return ImageBytesDataset(resolve_split(cfg.data, "train"))
    make_augmentation = moco_v2_augmentation if cfg.aug_plus else moco_v1_augmentation
    augmentation = make_augmentation(cfg.image_size, cfg.crop_min, flip=cfg.flip)
    if embedded is not None:
        return embedded_dataset(embedded, "pretrain", TwoCrops(augmentation), cfg.image_size)
    return ImageFolderDataset(resolve_split(cfg.data, "train"), TwoCrops(augmentation))


def build_pretrain_loader(cfg: PretrainConfig, dataset: torch.utils.data.Dataset,
                          device: torch.device) -> DataLoader | DevicePipeline:
    """drop_last keeps every batch full, so K stays a multiple of the batch and the queue wraps exactly.

    With the device pipeline the DataLoader only carries bytes; DevicePipeline decodes and augments on `device`
    and yields the same `(views, targets, skipped)` batches.
    """
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
    gpu = resolve_pipeline(cfg, device) == "gpu"
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=device.type == "cuda", collate_fn=collate_raw if gpu else collate_with_skips,
        generator=torch.Generator(), persistent_workers=False,
    )
    if not gpu:
        return loader
    from .gpu_augment import BatchedMocoAugment

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    augment = BatchedMocoAugment(cfg.image_size, crop_min=cfg.crop_min, aug_plus=cfg.aug_plus, flip=cfg.flip,
                                 out_dtype=training_dtype(cfg), memory_format=memory_format)
    return DevicePipeline(loader, augment, device)


def seed_epoch(loader: DataLoader | DevicePipeline, seed: int, epoch: int) -> None:
    """Make epoch `epoch` draw the same order and augmentations however the run got there (resume)."""
    epoch_seed = seed * 100_003 + epoch
    if isinstance(loader, DevicePipeline):
        loader.seed(epoch_seed + 15_485_863 * (du.rank() + 1))
        loader = loader.loader
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.sampler.generator.manual_seed(epoch_seed)
    loader.generator.manual_seed(epoch_seed + 7919 * (du.rank() + 1))
    torch.manual_seed(epoch_seed + 104_729 * (du.rank() + 1))
