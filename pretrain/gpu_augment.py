"""MoCo v1 / v2 (aug+) augmentations for a whole batch at once, on whatever device the images live on.

The CPU path (moco_transfer.augment) draws every random choice in Python and works image by image; on a GPU
that costs a kernel launch per image and a host sync per `.item()`. Here every random parameter is drawn as a
tensor on the images' device with the caller's generator and applied by batched ops, so a whole batch costs a
fixed number of launches and never waits on the device:

- RandomResizedCrop: torchvision's rule (10 tries, then the centre-crop fallback) evaluated for all tries of
  all samples at once; the antialiased bilinear resize is two batched matmuls with per-sample resampling
  matrices (the same triangle kernel torchvision/PIL use), and the horizontal flip is folded into them.
- ColorJitter in each sample's own random order: brightness, contrast and saturation are one masked blend per
  slot, and the hue shift runs once, between the blends each sample places before and after it.
- RandomGrayscale, Gaussian blur (per-sample sigma, grouped separable convolution), normalisation.

Only a list of differently sized images costs one copy per image (into a zero-padded batch).

The ops follow torchvision's tensor functional semantics; tests/test_gpu_augment.py checks them against
torchvision and PIL on CPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moco_transfer.augment import IMAGENET_MEAN, IMAGENET_STD

CROP_TRIES = 10
RATIO = (3 / 4, 4 / 3)
BLUR_SIGMA = (0.1, 2.0)  # for 224 px crops; scaled with image_size as the CPU path does
BLUR_TRUNCATE = 3.0  # kernel radius = ceil(BLUR_TRUNCATE * largest sigma)
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, torchvision's rgb_to_grayscale weights
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # torchvision's ColorJitter op ids


def _host_tensor_to(data: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host data onto `device` without a blocking copy (torch.tensor(..., device='cuda') syncs the stream)."""
    t = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) -> (B,1,H,W) grayscale, same float arithmetic as torchvision's tensor op."""
    r, g, b = x.unbind(1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of float RGB images in [0, 1] by `shift` (B,) turns; S and V stay.

    In HSV, max(RGB) = V and max - min = V*S, so after the rotation each channel is
    max - (max - min) * clamp(min(k, 4 - k), 0, 1) with k = (n + 6 * hue) mod 6 (n = 5, 3, 1 for R, G, B).
    This is the HSV -> RGB map torchvision implements with a lookup table, written as arithmetic.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1, keepdim=True)
    span = maxc - x.amin(dim=1, keepdim=True)
    inv = torch.where(span == 0, torch.ones_like(span), span).reciprocal_().squeeze(1)
    m = maxc.squeeze(1)
    # hue in sixths of a turn, in [-1, 5]; when span == 0 every channel equals max and the hue is irrelevant
    h6 = torch.where(m == r, (g - b).mul_(inv), torch.where(m == g, (b - r).mul_(inv).add_(2.0),
                                                              (r - g).mul_(inv).add_(4.0)))
    h6 = h6.add_(6.0 * shift.view(-1, 1, 1)).unsqueeze(1)
    offsets = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # R, G, B: 5, 3, 1
    k = torch.remainder(h6 + offsets, 6.0)
    return maxc - span * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """(n, out_size, in_size) rows that resize pixels [start, start + length) of each sample to out_size.

    Antialiased bilinear as in torchvision (antialias=True) and PIL: a triangle kernel widened by the scale
    factor when downscaling, plain bilinear when upscaling, renormalised over the pixels inside the crop, so
    no weight ever reaches outside the box (nor the zero padding of a batch of different sizes).
    """
    start = start.to(torch.float32).unsqueeze(1)
    length = length.to(torch.float32).unsqueeze(1)
    scale = length / out_size  # (n, 1)
    support = scale.clamp(min=1.0)
    centre = scale * (torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5)  # (n, out)
    pos = torch.arange(in_size, device=start.device, dtype=torch.float32) - start + 0.5  # (n, in), crop coords
    dist = (pos.unsqueeze(1) - centre.unsqueeze(2)).abs_().div_(support.unsqueeze(2))
    w = dist.neg_().add_(1.0).clamp_(min=0.0)
    inside = (pos > 0) & (pos < length)
    w = w.mul_(inside.unsqueeze(1))
    return w.div_(w.sum(dim=2, keepdim=True))


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(n, 2 * radius + 1) normalised Gaussian taps, one kernel per sigma."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t.unsqueeze(0) / sigma.to(torch.float32).unsqueeze(1)) ** 2)
    return k / k.sum(dim=1, keepdim=True)


class BatchedMocoAugment:
    """MoCo v2 aug+ (aug_plus=True) or v1 augmentation of a batch of uint8 images, one random draw per sample.

    Same op order and parameter distributions as moco_transfer.augment: v2 = crop, jitter (p 0.8),
    grayscale (p 0.2), blur (p 0.5), flip, normalise; v1 = crop, grayscale (p 0.2), jitter, flip, normalise.
    `blur=False` drops v2's blur (the MoCo CIFAR-10 demo's views); the blur's random draws are still made, so
    the other parameters a seeded generator gives do not move with the switch.
    """

    #: float32 bytes of padded input that one resize chunk may hold; a list with a few huge images is then
    #: processed in several matmuls (smallest images first) instead of padding the whole batch to the largest.
    max_chunk_bytes: int = 1 << 30
    #: dtype of the resize matmuls; None: float16 on CUDA (tensor cores; 0-255 pixels are exact in it and the
    #: result is within about 0.1 of a 0-255 level, see the tests), float32 elsewhere.
    resize_dtype: torch.dtype | None = None

    def __init__(self, image_size: int, crop_min: float = 0.2, aug_plus: bool = True, flip: bool = True,
                 blur: bool = True, out_dtype: torch.dtype = torch.float32,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
        if not 0.0 < crop_min <= 1.0:
            raise ValueError(f"crop_min: expected a fraction in (0, 1], got {crop_min!r}")
        if not out_dtype.is_floating_point:
            raise ValueError(f"out_dtype: expected a floating dtype, got {out_dtype}")
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError(f"memory_format: expected torch.contiguous_format or torch.channels_last, "
                             f"got {memory_format}")
        self.image_size = image_size
        self.crop_min = float(crop_min)
        self.aug_plus = aug_plus
        self.out_dtype = out_dtype
        self.memory_format = memory_format
        # torchvision's ColorJitter ranges: brightness/contrast/saturation [1 - 0.4, 1 + 0.4], hue [-h, h]
        hue = 0.1 if aug_plus else 0.4
        self.jitter_low = (0.6, 0.6, 0.6, -hue)
        self.jitter_high = (1.4, 1.4, 1.4, hue)
        self.jitter_p = 0.8 if aug_plus else 1.0
        self.gray_p = 0.2
        self.flip_p = 0.5 if flip else 0.0
        self.blur_p = 0.5 if aug_plus and blur else 0.0
        sigma_scale = image_size / 224
        self.blur_sigma = (BLUR_SIGMA[0] * sigma_scale, BLUR_SIGMA[1] * sigma_scale)
        self.blur_radius = max(1, math.ceil(BLUR_TRUNCATE * self.blur_sigma[1]))
        self._consts: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"BatchedMocoAugment(image_size={self.image_size}, crop_min={self.crop_min}, "
                f"aug_plus={self.aug_plus}, flip={self.flip_p > 0}, blur={self.blur_p > 0}, "
                f"out_dtype={self.out_dtype}, memory_format={self.memory_format})")

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """One augmented view per image: (B,3,S,S) normalised, in out_dtype and memory_format, same device."""
        return self.views(images, generator, 1)[0]

    def views(self, images: torch.Tensor | Sequence[torch.Tensor], generator: torch.Generator,
              n: int = 2) -> list[torch.Tensor]:
        """`n` independent views of each image, as `n` calls would give (the parameters are drawn in the same
        order), but the batch is checked, padded and converted to the resize dtype once for all of them."""
        sizes, device = self._sizes(images)
        size_tensor = _host_tensor_to(sizes, device, torch.int64)
        params = [self.sample_params(size_tensor, generator) for _ in range(n)]
        crops = self._cropped(images, sizes, device, params)
        return [self._finish(x, p) for x, p in zip(crops, params, strict=True)]

    # ---------------------------------------------------------------- parameters

    def sample_params(self, sizes: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw every random choice for a batch whose images have sizes (B,2) = (H,W), on sizes.device.

        Returns box (B,4) int64 top/left/height/width, flip/jitter/gray/blur (B,) bool, factors (B,4) float
        (brightness, contrast, saturation, hue), order (B,4) int64 (a permutation of the 4 jitter ops, applied
        left to right) and sigma (B,) float. The draws never depend on values, only on B, so a seeded generator
        gives the same parameters on any run.
        """
        if sizes.ndim != 2 or sizes.shape[1] != 2:
            raise ValueError(f"sizes: expected a (B, 2) tensor of (height, width), got shape {tuple(sizes.shape)}")
        device = sizes.device
        if generator.device.type != device.type:
            raise ValueError(f"generator: on {generator.device}, but the images are on {device}; "
                             f"pass torch.Generator(device={device.type!r})")
        n = sizes.shape[0]

        def uniform(*shape: int, low: float = 0.0, high: float = 1.0, dtype: torch.dtype = torch.float32):
            u = torch.rand(*shape, generator=generator, device=device, dtype=dtype)
            return u * (high - low) + low

        params = {"box": self._sample_boxes(sizes, uniform)}
        params["flip"] = uniform(n) < self.flip_p
        params["jitter"] = uniform(n) < self.jitter_p
        consts = self._device_consts(device)
        low, high = consts["jitter_low"], consts["jitter_high"]
        params["factors"] = low + uniform(n, 4) * (high - low)
        # argsort of iid uniforms is a uniformly random permutation per sample (torch.randperm per row)
        params["order"] = uniform(n, 4).argsort(dim=1)
        params["gray"] = uniform(n) < self.gray_p
        params["blur"] = uniform(n) < self.blur_p
        params["sigma"] = uniform(n, low=self.blur_sigma[0], high=self.blur_sigma[1])
        return params

    def _sample_boxes(self, sizes: torch.Tensor, uniform) -> torch.Tensor:  # noqa: ANN001 - the closure above
        """torchvision RandomResizedCrop.get_params, all samples and all 10 tries at once."""
        n = sizes.shape[0]
        hw = sizes.to(torch.float64)
        height, width = hw[:, 0:1], hw[:, 1:2]
        area = height * width
        target = area * uniform(n, CROP_TRIES, low=self.crop_min, high=1.0, dtype=torch.float64)
        log_ratio = uniform(n, CROP_TRIES, low=math.log(RATIO[0]), high=math.log(RATIO[1]), dtype=torch.float64)
        ratio = torch.exp(log_ratio)
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first valid try (0 if none)
        found = valid.any(dim=1, keepdim=True)
        w = w.gather(1, first)
        h = h.gather(1, first)
        u_top = uniform(n, 1, dtype=torch.float64)
        u_left = uniform(n, 1, dtype=torch.float64)
        top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
        left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
        # fallback: the whole image, or its centre clamped to the ratio range
        in_ratio = width / height
        fb_w = torch.where(in_ratio > RATIO[1], torch.round(height * RATIO[1]), width)
        fb_h = torch.where(in_ratio < RATIO[0], torch.round(width / RATIO[0]), height)
        fb_top = torch.floor((height - fb_h) / 2)
        fb_left = torch.floor((width - fb_w) / 2)
        box = torch.where(found, torch.cat([top, left, h, w], dim=1),
                          torch.cat([fb_top, fb_left, fb_h, fb_w], dim=1))
        return box.to(torch.int64)

    # ---------------------------------------------------------------- application

    def apply(self, images: torch.Tensor | Sequence[torch.Tensor], params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Deterministic given `params` (from sample_params for these images' sizes)."""
        sizes, device = self._sizes(images)
        return self._finish(self._cropped(images, sizes, device, [params])[0], params)

    def _cropped(self, images, sizes: list[list[int]], device: torch.device,  # noqa: ANN001
                 params: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The resized crops for each parameter set; every padded chunk is made and converted once."""
        dtype = self.resize_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        out: list[torch.Tensor | None] = [None] * len(params)
        for idx, chunk in self._chunks(images, sizes, device):
            chunk = chunk.to(dtype)  # 0-255 integers are exact in float16
            for v, p in enumerate(params):
                if idx is None:
                    out[v] = self._resized_crop(chunk, p["box"], p["flip"])
                    continue
                crop = self._resized_crop(chunk, p["box"].index_select(0, idx), p["flip"].index_select(0, idx))
                if out[v] is None:
                    out[v] = torch.empty((len(sizes), *crop.shape[1:]), device=device, dtype=crop.dtype)
                out[v].index_copy_(0, idx, crop)
        return out

    def _finish(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Everything after the crop: fixed (B,3,S,S) shapes and no data-dependent control flow."""
        if self.aug_plus:
            x = self._jitter(x, params)
            x = self._grayscale(x, params["gray"])
            if self.blur_p > 0:  # blur off: no convolution to throw away
                x = self._blur(x, params["blur"], params["sigma"])
        else:
            x = self._grayscale(x, params["gray"])
            x = self._jitter(x, params)
        return self._normalise(x)

    @staticmethod
    def _sizes(images: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[list[int]], torch.device]:
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
                raise ValueError(f"images: expected uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
            return [[images.shape[2], images.shape[3]]] * images.shape[0], images.device
        if len(images) == 0:
            raise ValueError("images: empty batch")
        device = images[0].device
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[0] != 3 or im.dtype != torch.uint8:
                raise ValueError(f"images[{i}]: expected uint8 (3, H, W), got {im.dtype} {tuple(im.shape)}")
            if im.device != device:
                raise ValueError(f"images[{i}]: on {im.device}, but images[0] is on {device}")
        return [[im.shape[1], im.shape[2]] for im in images], device

    def _chunks(self, images, sizes: list[list[int]], device: torch.device):  # noqa: ANN001, ANN202
        """Padded uint8 chunks that fit max_chunk_bytes as float32, with their sample indices (None: all)."""
        n = len(sizes)
        if isinstance(images, torch.Tensor):
            per = 3 * 4 * sizes[0][0] * sizes[0][1]
            step = max(1, self.max_chunk_bytes // per)
            if step >= n:
                yield None, images
                return
            for start in range(0, n, step):
                yield _host_tensor_to(list(range(start, min(n, start + step))), device, torch.int64), \
                    images[start:start + step]
            return
        order = sorted(range(n), key=lambda i: sizes[i][0] * sizes[i][1])
        groups: list[list[int]] = []
        group: list[int] = []
        hmax = wmax = 0
        for i in order:
            h, w = max(hmax, sizes[i][0]), max(wmax, sizes[i][1])
            if group and (len(group) + 1) * 12 * h * w > self.max_chunk_bytes:
                groups.append(group)
                group, h, w = [], sizes[i][0], sizes[i][1]
            group.append(i)
            hmax, wmax = h, w
        groups.append(group)
        if len(groups) == 1:
            groups = [list(range(n))]
        for group in groups:
            hmax = max(sizes[i][0] for i in group)
            wmax = max(sizes[i][1] for i in group)
            padded = torch.zeros(len(group), 3, hmax, wmax, dtype=torch.uint8, device=device)
            for row, i in enumerate(group):  # copies only; the augmentation itself is batched
                padded[row, :, : sizes[i][0], : sizes[i][1]] = images[i]
            idx = None if len(groups) == 1 else _host_tensor_to(group, device, torch.int64)
            yield idx, padded

    def _resized_crop(self, x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """0-255 values (n,3,H,W) in the resize dtype -> float32 (n,3,S,S) in [0,1]: crop, antialiased resize
        and flip as two matmuls."""
        s = self.image_size
        height, width = x.shape[2], x.shape[3]
        dtype = x.dtype
        wy = _resample_matrix(box[:, 0], box[:, 2], s, height)  # (n, S, H)
        wx = _resample_matrix(box[:, 1], box[:, 3], s, width)  # (n, S, W)
        wx = torch.where(flip.view(-1, 1, 1), wx.flip(1), wx)
        wy, wxt = wy.to(dtype).unsqueeze(1), wx.to(dtype).transpose(1, 2).unsqueeze(1)
        # contract the longer side first: cost S*W*(H+S) rows-first against S*H*(W+S) columns-first
        out = (wy @ x) @ wxt if width <= height else wy @ (x @ wxt)
        return out.to(torch.float32).mul_(1 / 255).clamp_(0.0, 1.0)

    def _jitter(self, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """ColorJitter with each sample's own order of the four ops (torchvision draws a permutation per image).

        Brightness, contrast and saturation are one blend, so the order is run as: the blends a sample places
        before its hue (3 slots), the hue shift (once for the whole batch), then the blends placed after it
        (3 slots). A sample with nothing to do in a slot blends with factor 1, which is exact identity; this
        costs one hue shift instead of one per slot.
        """
        apply = params["jitter"]
        order = params["order"]
        factors = params["factors"].to(torch.float32)
        hue_at = (order == HUE).to(torch.uint8).argmax(dim=1)
        for slot in range(3):
            x = self._blend_slot(x, order[:, slot], factors, apply & (hue_at > slot))
        shift = torch.where(apply, factors[:, HUE], torch.zeros_like(factors[:, HUE]))
        x = torch.where(apply.view(-1, 1, 1, 1), _shift_hue(x, shift), x)
        for slot in range(1, 4):
            x = self._blend_slot(x, order[:, slot], factors, apply & (hue_at < slot))
        return x

    @staticmethod
    def _blend_slot(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """clamp(f * x + (1 - f) * target, 0, 1), torchvision's _blend, per sample: brightness blends with 0,
        contrast with the mean of the grayscale image, saturation with the grayscale image."""
        f = factors.gather(1, op.unsqueeze(1)).squeeze(1)
        f = torch.where(active & (op != HUE), f, torch.ones_like(f)).view(-1, 1, 1, 1)
        gray = _luma(x)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        use_gray = (op == SATURATION).to(x.dtype).view(-1, 1, 1, 1)
        use_mean = (op == CONTRAST).to(x.dtype).view(-1, 1, 1, 1)
        target = gray.mul_(use_gray).add_(mean * use_mean)
        return (x * f).add_(target.mul_(1.0 - f)).clamp_(0.0, 1.0)

    @staticmethod
    def _grayscale(x: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
        return torch.where(gray.view(-1, 1, 1, 1), _luma(x).expand_as(x), x)

    def _blur(self, x: torch.Tensor, blur: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian, each sample its own sigma (grouped conv), edges replicated as PIL's box blur."""
        n, c, s, _ = x.shape
        r = self.blur_radius
        k = _gaussian_kernels(sigma, r)  # (n, 2r+1)
        k = k.unsqueeze(1).expand(n, c, 2 * r + 1).reshape(n * c, 1, 2 * r + 1)
        y = F.pad(x, (r, r, r, r), mode="replicate").reshape(1, n * c, s + 2 * r, s + 2 * r)
        y = F.conv2d(y, k.unsqueeze(3), groups=n * c)  # along height
        y = F.conv2d(y, k.unsqueeze(2), groups=n * c)  # along width
        return torch.where(blur.view(-1, 1, 1, 1), y.view(n, c, s, s), x)

    def _device_consts(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Small constant tensors, copied to each device once."""
        if device not in self._consts:
            self._consts[device] = {
                "mean": _host_tensor_to(list(IMAGENET_MEAN), device, torch.float32).view(1, 3, 1, 1),
                "std": _host_tensor_to(list(IMAGENET_STD), device, torch.float32).view(1, 3, 1, 1),
                "jitter_low": _host_tensor_to(list(self.jitter_low), device, torch.float32),
                "jitter_high": _host_tensor_to(list(self.jitter_high), device, torch.float32),
            }
        return self._consts[device]

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        consts = self._device_consts(x.device)
        x = (x - consts["mean"]).div_(consts["std"]).to(self.out_dtype)
        return x.contiguous(memory_format=self.memory_format)
