"""The device pipeline's start-up self-check: decoder, augmentation and the allocation-race guard, in about 1 s.

`--data-pipeline auto` on a GPU runs it once before choosing the device pipeline, so a broken nvJPEG, a wrong
kernel or a decoder that overwrites live memory costs a line at start-up instead of a silently corrupted run:
1. a few generated JPEGs of mixed sizes (one grayscale) decoded through DeviceDecoder and by PIL: mean absolute
   difference at most 2 levels;
2. the augmentation on the device and on the CPU with the same drawn parameters: the same pixels within what
   float16 resampling and TF32 convolutions allow;
3. a race canary: kernels queued behind a long one still read "victim" tensors that were freed before a decode
   through the guarded decoder; their sums must come out right.
The same code runs on CPU tensors (the tests call it there), where the canary has no stream to race.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD

from .device_decode import DeviceDecoder, decode_on_cpu
from .gpu_augment import BatchedMocoAugment

DECODE_TOLERANCE = 2.0  # mean absolute difference from PIL, in 0-255 levels (IDCT/upsampling variants)
AUGMENT_MEAN_TOLERANCE = 1.0  # 0-255 levels: float16 resampling weights and TF32 blur, against the CPU in fp32
AUGMENT_MAX_TOLERANCE = 8.0
CANARY_ROUNDS = 3
CANARY_SLEEP_CYCLES = 20_000_000  # torch.cuda._sleep: ~10 ms at GPU clocks, long enough to keep the reads queued
_SIZES = ((240, 320), (213, 320), (300, 400), (160, 128))  # (H, W); the last one grayscale


@dataclass
class SelfCheck:
    problem: str | None  # None when every check passed
    seconds: float
    decode_mad: float = float("nan")
    augment_mad: float = float("nan")
    augment_max: float = float("nan")
    corrupted_victims: int = 0


def sample_jpegs() -> list[bytes]:
    """Photo-like JPEGs of mixed sizes (smooth waves plus noise), the last one grayscale."""
    out = []
    for i, (h, w) in enumerate(_SIZES):
        rng = np.random.default_rng(i)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        image = np.stack([128 + 80 * np.sin(2 * np.pi * (rng.uniform(1, 5) * xx / w + rng.uniform(1, 5) * yy / h) + c)
                          for c in range(3)], axis=-1) + rng.normal(0, 6, (h, w, 3))
        pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
        if i == len(_SIZES) - 1:
            pil = pil.convert("L")
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _levels(view: torch.Tensor) -> torch.Tensor:
    """Normalised float views back to 0-255 levels, so tolerances read as pixel levels."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (view.double().cpu() * std + mean) * 255.0


def race_canary(decoder: DeviceDecoder, jpegs: list[torch.Tensor], shapes: list[tuple[int, ...]]) -> int:
    """Victims shaped like the decoder's outputs, read by kernels queued behind a long one, then freed while those
    reads wait; a decode through `decoder` follows. Returns how many read sums came out wrong."""
    corrupted = 0
    with decoder.on_stream():
        for _ in range(CANARY_ROUNDS if decoder.stream is not None else 1):  # no stream, no race: once
            victims = [torch.full(shape, 7, dtype=torch.uint8, device=decoder.device) for shape in shapes * 2]
            expected = [7 * v.numel() for v in victims]
            if decoder.stream is not None:
                torch.cuda._sleep(CANARY_SLEEP_CYCLES)
            sums = [v.sum(dtype=torch.int64) for v in victims]
            del victims  # back to the allocator while the reads above are still queued
            decoder.decode(jpegs)
            observed = torch.stack(sums).tolist()  # waits for everything queued
            corrupted += sum(o != e for o, e in zip(observed, expected, strict=True))
    return corrupted


def self_check(device: torch.device) -> SelfCheck:
    """Run the three checks on `device`; `problem` names the first that failed (None: all passed)."""
    start = time.perf_counter()
    result = SelfCheck(problem=None, seconds=0.0)
    try:
        decoder = DeviceDecoder(device)
        data = sample_jpegs()
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        images, refused = decoder.decode(encoded)
        decoder.fence()  # the images were made on the decoder's stream; they are read below on another
        if refused:
            result.problem = f"the device decoder refused a plain JPEG ({next(iter(refused.values()))})"
            return result
        references = [decode_on_cpu(d) for d in data]
        diffs = [(im.cpu().int() - ref.int()).abs().float().mean().item()
                 for im, ref in zip(images, references, strict=True)]
        result.decode_mad = max(diffs)
        if result.decode_mad > DECODE_TOLERANCE:
            result.problem = (f"decode_jpeg on {device} differs from PIL by {result.decode_mad:.2f} levels on "
                              f"average (at most {DECODE_TOLERANCE:g} expected)")
            return result

        augment = BatchedMocoAugment(32, crop_min=0.2, aug_plus=True)
        generator = torch.Generator(device=decoder.device).manual_seed(0)
        sizes = torch.tensor([list(im.shape[1:]) for im in images], dtype=torch.int64, device=decoder.device)
        with decoder.on_stream():
            params = augment.sample_params(sizes, generator)
            on_device = augment.apply(images, params)
        decoder.fence()
        on_cpu = augment.apply([im.cpu() for im in images], {k: v.cpu() for k, v in params.items()})
        diff = (_levels(on_device) - _levels(on_cpu)).abs()
        result.augment_mad, result.augment_max = diff.mean().item(), diff.max().item()
        if result.augment_mad > AUGMENT_MEAN_TOLERANCE or result.augment_max > AUGMENT_MAX_TOLERANCE:
            result.problem = (f"the augmentation on {device} differs from the CPU's at the same parameters by "
                              f"{result.augment_mad:.2f} levels on average, {result.augment_max:.1f} at most "
                              f"(expected at most {AUGMENT_MEAN_TOLERANCE:g} and {AUGMENT_MAX_TOLERANCE:g})")
            return result

        result.corrupted_victims = race_canary(decoder, encoded, [tuple(im.shape) for im in images])
        if result.corrupted_victims:
            result.problem = (f"the race canary found {result.corrupted_victims} tensors overwritten while a decode "
                              f"ran on {device}: nvJPEG wrote into memory still in use")
        return result
    except (RuntimeError, ValueError, OSError) as exc:
        result.problem = f"the self-check failed on {device}: {type(exc).__name__}: {exc}"
        return result
    finally:
        result.seconds = time.perf_counter() - start
