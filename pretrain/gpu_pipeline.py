"""The device data pipeline (`--data-pipeline gpu`): workers read bytes, the training device decodes and augments.

With the CPU pipeline each worker decodes and augments with PIL, about 81 images/s per core, so a GPU that
steps 2,500 images/s would need some 30 cores. Here the loader workers only read file bytes; a producer thread
decodes the JPEGs of a batch in one `torchvision.io.decode_jpeg` call on the device (`DeviceDecoder`, on a
stream of its own, guarded against the nvJPEG allocation race) and draws both views with `BatchedMocoAugment`
(per-sample parameters, vectorised ops), while the training thread runs the step before. The same code runs
on CPU tensors, so the tests exercise it without a GPU.

Files the device decoder should not get (PNG and other formats; grayscale, CMYK, progressive or truncated
JPEGs) are decoded in the worker with PIL, as the CPU pipeline does. A JPEG that still fails on the device is
decoded on the CPU; one that no decoder reads is replaced by the next readable file of the dataset, so batches
stay full, and its path is reported with the others that the epoch skipped.

A named set (`--data cifar10`, ...) is already a uint8 array: it is put on the device once (`DeviceArrays`) and
each batch is indexed there in the sampler's order, with no loader worker and nothing to decode.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torchvision.transforms.functional import pil_to_tensor

from moco_transfer import distributed as du
from moco_transfer.data import DataError, ImageFolderDataset

from .config import ConfigError, PretrainConfig
from .device_decode import DeviceDecoder, decode_on_cpu, device_decodable, is_device_fault, missing_decoder
from .prefetch import Prefetcher

if TYPE_CHECKING:
    from .gpu_augment import BatchedMocoAugment

_MAX_REPLACEMENTS = 64  # as ImageFolderDataset: that many unreadable files in a row is a broken dataset
CPU_DECODE_WARN_FRACTION = 0.01  # more than this share of an epoch decoded by PIL: say so, once
_EXAMPLES = 20  # paths per kind kept in an epoch's log record

__all__ = ["DeviceArrays", "DevicePipeline", "ImageBytesDataset", "TensorImages", "collate_raw", "decode_on_cpu",
           "device_decodable", "pipeline_choice", "resolve_pipeline", "training_dtype"]


class PipelineChoice(NamedTuple):
    name: str  # "cpu" or "gpu"
    reason: str  # why auto did not take the device pipeline on a GPU; empty otherwise


_DEVICE_PROBLEMS: dict[str, str | None] = {}  # device -> why the device pipeline cannot run there (None: it can)


def device_problem(device: torch.device) -> str | None:
    """Why the device pipeline must not run on this GPU, or None; the self-check runs once per device."""
    if torch.version.hip is not None:
        return (f"{device} is a ROCm device (HIP {torch.version.hip}): this pipeline is built and checked for "
                "NVIDIA's nvJPEG only")
    missing = missing_decoder()
    if missing is not None:
        return missing
    key = str(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))
    if key not in _DEVICE_PROBLEMS:
        from .device_check import self_check

        _DEVICE_PROBLEMS[key] = self_check(torch.device(key)).problem
    return _DEVICE_PROBLEMS[key]


def pipeline_choice(cfg: PretrainConfig, device: torch.device) -> PipelineChoice:
    """auto: the device pipeline on an NVIDIA GPU that passes the self-check, the CPU pipeline otherwise.

    On a CPU device `gpu` runs the same code on CPU tensors (tests, CI) without the self-check. On a GPU, an
    explicit `gpu` whose self-check fails is a ConfigError naming the failure.
    """
    if cfg.data_pipeline == "cpu" or (device.type != "cuda" and cfg.data_pipeline == "auto"):
        return PipelineChoice("cpu", "")
    if device.type != "cuda":
        return PipelineChoice("gpu", "")
    problem = device_problem(device)
    if problem is None:
        return PipelineChoice("gpu", "")
    if cfg.data_pipeline == "gpu":
        raise ConfigError(f"--data-pipeline gpu: {problem}")
    return PipelineChoice("cpu", f"--data-pipeline auto took the CPU pipeline: {problem}")


def resolve_pipeline(cfg: PretrainConfig, device: torch.device) -> str:
    """The pipeline a run uses: "cpu" or "gpu" (see pipeline_choice)."""
    return pipeline_choice(cfg, device).name


def training_dtype(cfg: PretrainConfig) -> torch.dtype:
    """The views come out in the autocast dtype, which halves what the first convolution reads."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp, torch.float32)


class ImageBytesDataset(ImageFolderDataset):
    """Class-folder images as raw file bytes (1-D uint8) when the device can decode them, else decoded RGB.

    Items are `(data, target, bad_paths, file_index)`: unreadable files are replaced by the next readable one
    as in ImageFolderDataset, and `file_index` says which file was read, so the main process can continue
    from there when the device decoder rejects it.
    """

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None,
                 samples: list[tuple[str, int]] | None = None) -> None:
        super().__init__(root, None, classes, samples)

    def load(self, index: int) -> torch.Tensor:  # type: ignore[override]
        with open(self.samples[index][0], "rb") as f:
            data = bytearray(f.read())
        if device_decodable(data):
            return torch.frombuffer(data, dtype=torch.uint8)
        return decode_on_cpu(data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...], int]:  # type: ignore[override]
        data, target, bad = super().__getitem__(index)
        return data, target, bad, (index + len(bad)) % len(self)  # each failed attempt adds one bad path


class TensorImages(torch.utils.data.Dataset):
    """An in-memory dataset of `(PIL image, target, bad)` items served as uint8 3xHxW RGB tensors."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset
        self.root = getattr(dataset, "root", Path("<in-memory>"))
        self.classes = getattr(dataset, "classes", None)
        self.targets = getattr(dataset, "targets", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...], int]:
        image, target, bad = self.dataset[index]
        if not isinstance(image, torch.Tensor):
            image = pil_to_tensor(image.convert("RGB"))
        return image, target, bad, index


class DeviceArrays(torch.utils.data.Dataset):
    """A named set's uint8 images held on the training device, put there once (the device pipeline's array path).

    DevicePipeline indexes `images` itself, batch by batch in the sampler's order, so no loader worker runs and
    nothing is decoded; grayscale images (C 1) are kept so and served as RGB by expanding the channel per batch.
    Indexing the dataset (a DataLoader over it) gives the items TensorImages gives, from the same tensor.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, device: torch.device,
                 root: str = "<arrays>", classes: list[str] | None = None, chunk: int = 1 << 28) -> None:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype not in (np.uint8, torch.uint8):
            raise ValueError(f"images: expected uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        n = len(images)
        self.images = torch.empty(tuple(images.shape), dtype=torch.uint8, device=device)
        step = max(1, chunk // max(1, int(np.prod(images.shape[1:]))))
        for start in range(0, n, step):  # bounded host copies: a memory-mapped or transposed array is read once
            part = images[start:start + step]
            part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part, order="C"))
            self.images[start:start + step].copy_(part)
        self.targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(-1)
        if len(self.targets) != n:
            raise ValueError(f"targets: {len(self.targets)} for {n} images")
        self.root = Path(root)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) on the device; `indices` on the device too."""
        images = self.images.index_select(0, indices)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, tuple[str, ...], int]:
        image = self.images[index]
        return (image.expand(3, -1, -1) if image.shape[0] == 1 else image).cpu(), int(self.targets[index]), (), index


def collate_raw(batch: Sequence[tuple[torch.Tensor, int, tuple[str, ...], int]]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """One flat uint8 payload per batch (one shared-memory block from a worker, not one per image) and its layout.

    Row i of the layout is (nbytes, C, H, W, file index): C = 0 marks encoded file bytes, else the item is a
    decoded CxHxW image.
    """
    layout = torch.tensor([[data.numel(), *(data.shape if data.dim() == 3 else (0, 0, 0)), index]
                           for data, _, _, index in batch], dtype=torch.long)
    payload = torch.cat([b[0].reshape(-1) for b in batch])
    targets = torch.as_tensor([b[1] for b in batch], dtype=torch.long)
    return payload, layout, targets, [p for b in batch for p in b[2]]


@dataclass
class DecodeCounts:
    """What one epoch decoded where: a few paths of each kind are kept for the log."""

    images: int = 0
    in_workers: int = 0  # not for the device decoder (PNG, grayscale, CMYK, progressive, truncated): PIL in a worker
    refused: int = 0  # the device decoder refused them, PIL read them in the producer thread
    in_workers_paths: list[str] = field(default_factory=list)
    refused_paths: list[str] = field(default_factory=list)

    def note(self, kind: str, path: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        paths = getattr(self, f"{kind}_paths")
        if len(paths) < _EXAMPLES:
            paths.append(path)


class _Batch(NamedTuple):
    views: list[torch.Tensor]
    targets: torch.Tensor
    bad: list[str]
    ready: torch.cuda.Event | None  # recorded on the decoder's stream after the views were made
    rng_after: torch.Tensor  # the augmentation generator's state after this batch's draws


class DevicePipeline:
    """Iterates like the CPU loader: `([query views, key views], targets, skipped paths)` per batch.

    Wraps a DataLoader over ImageBytesDataset or TensorImages with collate_raw and drop_last. A producer thread
    (`prefetch` batches ahead; 0: in the calling thread) decodes and augments on `device`, on the decoder's
    stream; each batch reaches the training stream through an event and `record_stream`, so the training thread
    never waits on the host for it. The augmentation generator is seeded per epoch through `seed`
    (pretrain.data.seed_epoch), and one producer draws batches in order, so an epoch draws the same views
    however the run got there.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, augment: BatchedMocoAugment,
                 device: torch.device, prefetch: int = 2) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch: expected 0 or more batches, got {prefetch}")
        self.loader, self.augment, self.prefetch = loader, augment, prefetch
        self.decoder = DeviceDecoder(device)
        self.device = self.decoder.device
        self.dataset = loader.dataset
        self.generator = torch.Generator(device=self.device)
        self.counts = DecodeCounts()
        self._warned = False
        self.consumed_rng: torch.Tensor | None = None  # generator state after the last batch handed over

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self) -> Any:
        return self.loader.sampler

    def seed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list[str]]]:
        self.counts = DecodeCounts()
        if self.prefetch == 0:
            for batch in self._produce():
                yield self._hand_over(batch)
            return
        producer = Prefetcher(self._produce(), self.prefetch, name="moco-device-pipeline")
        try:
            for batch in producer:
                yield self._hand_over(batch)
        finally:  # epoch end, an error on either side, Ctrl-C, or a consumer that stops early
            producer.close()

    def _produce(self) -> Iterator[_Batch]:
        if self.device.type == "cuda":
            # The current device is per host thread and a new one starts on GPU 0: without this, the loader's
            # pin-memory thread (started below) and every allocation would open a context on GPU 0 for each rank.
            torch.cuda.set_device(self.device)
        raw = self._array_batches() if isinstance(self.dataset, DeviceArrays) else self._file_batches()
        total = len(self.loader)
        for index, (read, targets, bad) in enumerate(raw):
            try:
                with torch.no_grad(), self.decoder.on_stream():
                    images, more_bad = read()
                    views = self.augment.views(images, self.generator)
                    ready = None
                    if self.decoder.stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(self.decoder.stream)
            except RuntimeError as exc:
                if not is_device_fault(exc):
                    raise
                raise _with_context(exc, f"device data pipeline (--data-pipeline gpu), batch {index + 1} of "
                                         f"{total} on {self.device}") from exc
            self.counts.images += len(targets)
            yield _Batch(views, targets, bad + more_bad, ready, self.generator.get_state())

    def _file_batches(self) -> Iterator[tuple[Callable[[], tuple[Any, list[str]]], torch.Tensor, list[str]]]:
        """The loader's batches of file bytes (or worker-decoded images), each with how to decode it here."""
        for payload, layout, targets, bad in self.loader:
            yield functools.partial(self.decode, payload, layout), targets, bad

    def _array_batches(self) -> Iterator[tuple[Callable[[], tuple[Any, list[str]]], torch.Tensor, list[str]]]:
        """The loader's batches without the loader: the sampler's indices, batch_size at a time, the tail dropped
        (drop_last), read from the arrays on the device. The same order, and the same generator draws, as batches
        that came through the DataLoader, so seed_epoch and start_epoch_at work unchanged."""
        size = self.loader.batch_size
        order = list(self.loader.sampler)
        for index in range(len(order) // size):
            chosen = order[index * size:(index + 1) * size]
            yield functools.partial(self._read_rows, chosen), self.dataset.targets[chosen], []

    def _read_rows(self, chosen: list[int]) -> tuple[torch.Tensor, list[str]]:
        rows = torch.tensor(chosen, dtype=torch.long)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        return self.dataset.batch(rows.to(self.device, non_blocking=True)), []

    def _hand_over(self, batch: _Batch) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
        """Order the training stream after the batch's kernels (no host wait) and keep its memory until used.

        An event recorded when the batch was done, not wait_stream at hand-over: by then the decoder's stream
        may already be working on the next batch, which the step need not wait for.
        """
        if batch.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(batch.ready)
            for view in batch.views:
                view.record_stream(stream)
        self.consumed_rng = batch.rng_after  # the producer may be batches ahead: a mid-epoch save needs this one
        return batch.views, batch.targets, batch.bad

    def decode(self, payload: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor],
                                                                            list[str]]:
        """uint8 RGB images on the device: one batched decode_jpeg call for the encoded files.

        Returns a (B,3,H,W) tensor when every item came decoded at one size (the in-memory sets), else a
        list of 3xHxWi tensors, and the paths of files that no decoder read (replaced by readable ones).
        """
        with self.decoder.on_stream():
            return self._decode(payload, layout)

    def _decode(self, payload: torch.Tensor, layout: torch.Tensor) -> tuple[torch.Tensor | list[torch.Tensor],
                                                                             list[str]]:
        rows = layout.tolist()
        if all(r[1] for r in rows) and len({tuple(r[1:4]) for r in rows}) == 1:
            self._count_worker_decoded(rows)
            c, h, w = rows[0][1:4]
            return payload.view(len(rows), c, h, w).to(self.device, non_blocking=True), []
        pieces = payload.split([r[0] for r in rows])
        images: list[torch.Tensor | None] = [
            p.view(r[1], r[2], r[3]).to(self.device, non_blocking=True) if r[1] else None
            for p, r in zip(pieces, rows, strict=True)]
        self._count_worker_decoded(rows)
        encoded = [i for i, r in enumerate(rows) if not r[1]]
        decoded, refused = self.decoder.decode([pieces[i] for i in encoded])
        bad: list[str] = []
        for j, i in enumerate(encoded):
            image = decoded[j]
            if image is None:
                image = self._read_refused(pieces[i], rows[i][4], refused[j], bad)
            images[i] = image
        return images, bad  # type: ignore[return-value]

    def _count_worker_decoded(self, rows: list[list[int]]) -> None:
        if isinstance(self.dataset, ImageBytesDataset):  # in-memory sets are decoded by design
            for r in rows:
                if r[1]:
                    self.counts.note("in_workers", self.dataset.samples[r[4]][0])

    def _read_refused(self, data: torch.Tensor, file_index: int, device_error: str, bad: list[str]) -> torch.Tensor:
        """PIL for a file the device decoder refused; the next readable file when PIL cannot read it either."""
        path = self.dataset.samples[file_index][0]
        try:
            image = decode_on_cpu(memoryview(data.numpy()))
        except (OSError, ValueError, SyntaxError) as exc:
            bad.append(f"{path} (decode_jpeg: {device_error}; PIL {type(exc).__name__}: {exc})")
            return self._next_readable(file_index, bad)
        self.counts.note("refused", path)
        return image.to(self.device, non_blocking=True)

    def _next_readable(self, file_index: int, bad: list[str]) -> torch.Tensor:
        """The skip rule of ImageFolderDataset, run here: the next file after `file_index` that decodes."""
        dataset = self.dataset
        for step in range(1, _MAX_REPLACEMENTS + 1):
            index = (file_index + step) % len(dataset)
            path = dataset.samples[index][0]
            try:
                data = dataset.load(index)
            except (OSError, ValueError, SyntaxError) as exc:
                bad.append(f"{path} ({type(exc).__name__}: {exc})")
                continue
            if data.dim() == 3:
                return data.to(self.device, non_blocking=True)
            (image,), refused = self.decoder.decode([data])
            if image is not None:
                return image
            try:
                image = decode_on_cpu(memoryview(data.numpy()))
            except (OSError, ValueError, SyntaxError) as exc:
                bad.append(f"{path} (decode_jpeg: {refused[0]}; PIL {type(exc).__name__}: {exc})")
                continue
            self.counts.note("refused", path)
            return image.to(self.device, non_blocking=True)
        raise DataError(f"{dataset.root}: {_MAX_REPLACEMENTS} consecutive unreadable images after "
                        f"{dataset.samples[file_index][0]}: {bad[-3:]} ...")

    def epoch_record(self) -> dict[str, Any]:
        """The epoch's decode figures for log.jsonl, summed over ranks (a collective: call it on every rank)."""
        counts = self.counts
        totals = [du.all_reduce_mean(float(v), self.device) * du.world_size()
                  for v in (counts.images, counts.in_workers, counts.refused)]
        images, in_workers, refused = (int(round(v)) for v in totals)
        record: dict[str, Any] = {"decoded_on_cpu": in_workers + refused, "device_refused": refused}
        if counts.in_workers_paths or counts.refused_paths:
            record["decoded_on_cpu_examples"] = (counts.refused_paths + counts.in_workers_paths)[:_EXAMPLES]
        self._last_totals = (images, in_workers, refused)
        return record

    def fallback_warning(self) -> str | None:
        """Once per run: a line naming the likely cause when more than 1% of the epoch was decoded by PIL."""
        images, in_workers, refused = getattr(self, "_last_totals", (0, 0, 0))
        if self._warned or not images or (in_workers + refused) <= CPU_DECODE_WARN_FRACTION * images:
            return None
        self._warned = True
        share = f"{in_workers + refused} of {images} images ({(in_workers + refused) / images:.1%})"
        if refused >= in_workers:
            example = (self.counts.refused_paths or ["?"])[0]
            return (f"warning: {share} this epoch were decoded with PIL on the CPU, mostly because the device "
                    f"decoder refused them (e.g. {example}); each is decoded in the training process and slows "
                    "the step. Likely cause: JPEG variants nvJPEG does not take, or a torchvision/nvJPEG fault. "
                    "Re-encode them as baseline RGB JPEGs, or use --data-pipeline cpu.")
        example = (self.counts.in_workers_paths or ["?"])[0]
        return (f"warning: {share} this epoch were decoded with PIL in the loader workers because they are not "
                f"baseline 8-bit RGB JPEGs (PNG, grayscale, CMYK, progressive or truncated; e.g. {example}). "
                "Likely cause: the dataset's format. Re-encode them as baseline RGB JPEGs, or give the loader "
                "more --workers.")


def _with_context(exc: RuntimeError, context: str) -> RuntimeError:
    """The same error type (so `except torch.OutOfMemoryError` still works), its message prefixed."""
    try:
        return type(exc)(f"{context}: {exc}")
    except TypeError:
        return RuntimeError(f"{context}: {exc}")
