"""The device pipeline's start-up self-check, on CPU tensors: it passes on a sound decoder and augmentation, and
names what broke when either is wrong. The race canary needs a CUDA stream: tests/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from moco_transfer.pretrain import device_decode
from moco_transfer.pretrain.device_check import sample_jpegs, self_check
from moco_transfer.pretrain.device_decode import decode_on_cpu, device_decodable
from moco_transfer.pretrain.gpu_augment import BatchedMocoAugment

CPU = torch.device("cpu")
_REAL_DECODE = device_decode.jpeg_decoder()


def test_the_check_images_are_mixed_sizes_with_one_grayscale():
    jpegs = sample_jpegs()
    shapes = {tuple(decode_on_cpu(j).shape) for j in jpegs}
    assert len(shapes) == len(jpegs) >= 4
    assert [device_decodable(j) for j in jpegs] == [True] * (len(jpegs) - 1) + [False]  # the last: 1 component


def test_a_sound_device_passes_with_its_figures():
    result = self_check(CPU)
    assert result.problem is None
    assert result.decode_mad == 0.0  # torchvision's CPU decoder and PIL both use libjpeg-turbo's defaults here
    assert result.augment_mad == 0.0 and result.corrupted_victims == 0
    assert 0 < result.seconds < 30


def test_a_decoder_that_is_off_by_a_few_levels_is_named(monkeypatch):
    def brighter(data, mode=None, device=None):  # noqa: ANN001, ANN202
        return [im.clamp(max=250) + 5 for im in _REAL_DECODE(data, device=device)]

    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: brighter)
    result = self_check(CPU)
    assert result.problem.startswith("decode_jpeg on cpu differs from PIL by ")
    assert result.decode_mad > 2.0


def test_an_augmentation_that_differs_from_the_cpu_is_named(monkeypatch):
    calls = []
    real_apply = BatchedMocoAugment.apply

    def apply(self, images, params):  # noqa: ANN001, ANN202 - the first call is the "device" one
        out = real_apply(self, images, params)
        calls.append(1)
        return out + 0.05 if len(calls) == 1 else out

    monkeypatch.setattr(BatchedMocoAugment, "apply", apply)
    result = self_check(CPU)
    assert result.problem.startswith("the augmentation on cpu differs from the CPU's at the same parameters by ")
    assert result.augment_mad == pytest.approx(0.05 * 255 * 0.226, rel=0.02)  # 0.05 std units in 0-255 levels


def test_a_device_error_during_the_check_is_a_problem_not_a_crash(monkeypatch):
    def oom(data, mode=None, device=None):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(device_decode, "jpeg_decoder", lambda: oom)
    result = self_check(CPU)
    assert result.problem == ("the self-check failed on cpu: OutOfMemoryError: CUDA out of memory. Tried to allocate "
                              "20.00 MiB")

