"""JPEG decoding on the training device: which files go there, the guarded batched call, and what an error means.

The nvJPEG race. torchvision's CUDA `decode_jpeg` allocates its outputs on the caller's current stream, then
decodes on a private stream that does not wait for the caller's, and nvJPEG's hardware engine (A100, H100,
H200) does not honour stream order anyway. PyTorch's caching allocator hands out a block as soon as it is freed
on its stream, so the decoder can be given memory that kernels queued on that stream are still reading, and
overwrite it (pytorch/vision PR 9606: 199 of 200 iterations corrupted on an H100; torchcodec fixed its own copy
the same way, meta-pytorch/torchcodec PR 1634). `DeviceDecoder` decodes on a stream of its own and host-waits
for that stream before every call, so no block the allocator can give the decoder is still in use: blocks that
other streams use are handed over with `record_stream`, which the allocator honours with events. torchvision
then orders the outputs after the decode on the current stream (an event it records), so later work on our
stream sees finished pixels. The wait runs in the pipeline's producer thread, never in the training thread.
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

# Sequential Huffman frames, which nvjpeg batch-decodes (in hardware on A100/H100). Progressive ones it decodes
# one by one with host work and a stream sync each, which the loader workers do better; the rest go to PIL too.
_SOF_MARKERS = frozenset({0xC0, 0xC1})
_SOURCE_LOCATION = re.compile(r"^[\w.]+, \S+:\d+, ")  # torchvision's "decode_jpeg, file.cpp:171, "
# Messages of errors that come from the device, not from the file: they must reach the user, not a fallback.
# nvJPEG's status 5 is NVJPEG_STATUS_ALLOCATOR_FAILURE (torchvision reports statuses as numbers).
_DEVICE_FAULT = re.compile(r"out of memory|CUDA error|cudaError|CUDA driver|CUBLAS_STATUS|CUDNN_STATUS|"
                           r"device-side assert|ALLOCATOR_FAILURE|(?:failed|Failed)[^:\n]*: 5\b")


def device_decodable(data: bytes | bytearray) -> bool:
    """True for a complete-looking 8-bit, 3-component sequential JPEG: what nvjpeg decodes fast, in one batch.

    Reads the marker segments up to the frame header. A file without the end-of-image marker (truncated) or
    with 1 (grayscale) or 4 (CMYK/YCCK) components, or progressive, returns False and is decoded on the CPU.
    """
    if len(data) < 4 or data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return False
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS:
            return pos + 10 <= len(data) and data[pos + 4] == 8 and data[pos + 9] == 3
        if marker in (0xDA, 0xD9) or (0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return False  # scan data before any frame header, or another frame type (progressive, lossless...)
        pos += 2 + length
    return False


def decode_on_cpu(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """PIL decode to a uint8 3xHxW RGB tensor: the CPU pipeline's reader, so the same files are readable."""
    with Image.open(io.BytesIO(data)) as image:
        return pil_to_tensor(image.convert("RGB"))


def is_device_fault(exc: BaseException) -> bool:
    """True for out-of-memory and CUDA errors, which say nothing about the file being decoded.

    torch.OutOfMemoryError and torch.AcceleratorError are RuntimeError subclasses, as are torchvision's decode
    errors, so the type alone does not tell them apart; the message does for the rest.
    """
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if isinstance(exc, torch.OutOfMemoryError) or (accelerator_error and isinstance(exc, accelerator_error)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    return bool(_DEVICE_FAULT.search(str(exc)))


def short_error(exc: BaseException) -> str:
    """The last line of a decode error without torchvision's source location."""
    return _SOURCE_LOCATION.sub("", str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)


def jpeg_decoder() -> Callable[..., Any] | None:
    """torchvision's batched `decode_jpeg`, or None where this torchvision has none.

    Looked up when first needed, not at import: torchvision 0.29 deprecates its image codecs in favour of
    TorchCodec, and an import-time name would take every `moco pretrain` down with it, the CPU pipeline too.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def missing_decoder() -> str | None:
    """Why the device pipeline cannot decode files here, or None."""
    if jpeg_decoder() is not None:
        return None
    import torchvision

    return (f"torchvision {torchvision.__version__} has no torchvision.io.decode_jpeg: the device pipeline cannot "
            "decode JPEG files (use --data-pipeline cpu)")


class DeviceDecoder:
    """Batched `decode_jpeg` on `device`, on a stream of its own, safe from the allocation race (module doc).

    On a CPU device there is no stream and nothing to wait for; the calls are the same, so CI runs this code.
    """

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.calls = 0  # decode_jpeg calls made, failed ones included
        self._decode_jpeg: Callable[..., Any] | None = None

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Make this decoder's stream (and device) current in the calling thread."""
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def fence(self) -> None:
        """Host-wait until everything queued on our stream has run: the allocator's free blocks are then idle."""
        if self.stream is not None:
            self.stream.synchronize()

    def decode(self, encoded: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], dict[int, str]]:
        """Decode 1-D uint8 CPU tensors of JPEG bytes to uint8 3xHxW RGB on the device, in batched calls.

        One call when every file decodes. When the call fails on a file (a decode error, not a device fault),
        the batch is split in halves and each half decoded in one call, recursively, so each good file is
        decoded once and a bad one costs about log2(len) extra calls, never a file-by-file pass. Returns the
        images (None for a refused file) and {index: the device decoder's error} for the refused ones.
        Device faults (out of memory, CUDA errors) propagate.
        """
        images: list[torch.Tensor | None] = [None] * len(encoded)
        errors: dict[int, str] = {}
        with self.on_stream():
            self._decode_range(list(encoded), 0, len(encoded), images, errors)
        return images, errors

    def _decode_range(self, encoded: list[torch.Tensor], lo: int, hi: int, images: list[torch.Tensor | None],
                      errors: dict[int, str]) -> None:
        if lo >= hi:
            return
        if self._decode_jpeg is None:
            self._decode_jpeg = jpeg_decoder()
            if self._decode_jpeg is None:
                raise RuntimeError(missing_decoder())
        self.fence()
        self.calls += 1
        try:
            images[lo:hi] = self._decode_jpeg(encoded[lo:hi], device=self.device)
            return
        except (RuntimeError, ValueError) as exc:
            if is_device_fault(exc):
                raise
            if hi - lo == 1:
                errors[lo] = short_error(exc)
                return
        mid = (lo + hi) // 2
        self._decode_range(encoded, lo, mid, images, errors)
        self._decode_range(encoded, mid, hi, images, errors)
