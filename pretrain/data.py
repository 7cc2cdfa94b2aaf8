"""Pretraining data: two augmented views per image, full batches only, deterministic per epoch and per item.

Every epoch's order comes from `EpochSampler` and every item's views from a seed of its own (`SeededItems`),
so an epoch draws the same views with any number of loader workers and can resume at any batch: a run
stopped mid-epoch continues with the views it would have drawn.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from moco_transfer import distributed as du
from moco_transfer.augment import TwoCrops, moco_v1_augmentation, moco_v2_augmentation
from moco_transfer.data import (
    DataError,
    ImageFolderDataset,
    collate_with_skips,
    embedded_dataset,
    embedded_name,
)
from moco_transfer.file_lists import pretrain_samples, scan_once
from moco_transfer.named_sets import ArrayImages, load_named_split, named_set
from moco_transfer.seeded_order import EpochSampler, SeededItems, epoch_seed
from moco_transfer.signals import loader_worker_init

from .config import PretrainConfig
from .cpu_views import fast_views, hue_tables
from .gpu_pipeline import (
    DeviceArrays,
    DevicePipeline,
    ImageBytesDataset,
    TensorImages,
    collate_raw,
    resolve_pipeline,
    training_dtype,
)


def build_pretrain_dataset(cfg: PretrainConfig, device: torch.device | None = None) -> torch.utils.data.Dataset:
    """Augmented view pairs (CPU pipeline), or undecoded bytes / uint8 images for the device pipeline.

    A named set is one uint8 array: the device pipeline holds it on `device` (DeviceArrays) and draws the views
    there without loader workers. A folder or list is scanned by rank 0 alone and shared with the other ranks.
    """
    device = device or torch.device("cpu")
    gpu = resolve_pipeline(cfg, device) == "gpu"
    named = named_set(cfg.data)
    if named is not None:
        split = load_named_split(named, "pretrain", cfg.data_root, all_ranks=True)
        if gpu:
            return DeviceArrays(split.images, split.targets, device, root=f"<{named}:pretrain {split.folder}>",
                                classes=split.classes)
    embedded = embedded_name(cfg.data)
    if gpu:
        if embedded is not None:
            return TensorImages(embedded_dataset(embedded, "pretrain", None, cfg.image_size))
        found = scan_once(lambda: pretrain_samples(cfg.data), all_ranks=True)
        return ImageBytesDataset(found.root, found.classes, found.samples)
    if cfg.aug_plus:
        augmentation = moco_v2_augmentation(cfg.image_size, cfg.crop_min, flip=cfg.flip, blur=cfg.blur)
    else:  # v1 has no blur to switch off
        augmentation = moco_v1_augmentation(cfg.image_size, cfg.crop_min, flip=cfg.flip)
    views = TwoCrops(fast_views(augmentation))  # the recipe's draws, a faster hue, uint8 out (cpu_views.py)
    hue_tables()  # here, before the loader forks its workers: they share the tables
    if named is not None:
        return SeededItems(ArrayImages(split, views))
    if embedded is not None:
        return SeededItems(embedded_dataset(embedded, "pretrain", views, cfg.image_size))
    found = scan_once(lambda: pretrain_samples(cfg.data), all_ranks=True)
    return SeededItems(ImageFolderDataset(found.root, views, found.classes, found.samples))


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
    gpu = resolve_pipeline(cfg, device) == "gpu"
    sampler = EpochSampler(len(dataset), per_rank, world, du.rank(), keys=not gpu)  # the device path reads indices
    loader = DataLoader(
        dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers, drop_last=True,
        pin_memory=device.type == "cuda", collate_fn=collate_raw if gpu else collate_with_skips,
        generator=torch.Generator(), persistent_workers=False, worker_init_fn=loader_worker_init(),
    )
    if not gpu:
        return loader
    from .gpu_augment import BatchedMocoAugment

    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    augment = BatchedMocoAugment(cfg.image_size, crop_min=cfg.crop_min, aug_plus=cfg.aug_plus, flip=cfg.flip,
                                 blur=cfg.blur, out_dtype=training_dtype(cfg), memory_format=memory_format)
    return DevicePipeline(loader, augment, device)


def seed_epoch(loader: DataLoader | DevicePipeline, seed: int, epoch: int) -> None:
    """Make epoch `epoch` draw the same order and augmentations however the run got there (resume)."""
    base = epoch_seed(seed, epoch)
    if isinstance(loader, DevicePipeline):
        loader.seed(base + 15_485_863 * (du.rank() + 1))
        loader = loader.loader
    loader.sampler.set_epoch_seed(base)  # the CPU path's views too: its keys carry the seed (SeededItems)
    loader.generator.manual_seed(base + 7919 * (du.rank() + 1))
    torch.manual_seed(base + 104_729 * (du.rank() + 1))


def start_epoch_at(loader: DataLoader | DevicePipeline, batch: int, pipeline_state: torch.Tensor | None) -> str | None:
    """After seed_epoch: begin the epoch at `batch`, with the device pipeline's generator where it stood then.

    A state from the other generator kind (a CUDA Philox state is 16 bytes, a CPU Mersenne one 5,056) cannot be
    set: the run then keeps its place, with the generator as seed_epoch left it, and the returned note says
    that the rest of the epoch draws other views than the stopped run would have. (The same holds, unnoticed,
    across GPU models: Philox's output depends on the launch geometry; see docs/cluster.md.)
    """
    note = None
    if isinstance(loader, DevicePipeline):
        if pipeline_state is not None and pipeline_state.numel() == loader.generator.get_state().numel():
            loader.generator.set_state(pipeline_state)
        elif pipeline_state is not None:
            note = (f"the mid-epoch checkpoint's device-pipeline generator state is not a {loader.device.type} one "
                    f"(written on another device type): the rest of this epoch draws other views than the stopped "
                    f"run would have; the batches and their order are the same")
        loader = loader.loader
    loader.sampler.start_at(batch)
    return note
