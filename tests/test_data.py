"""Datasets, augmentations, and corrupt-file handling."""

from __future__ import annotations

import pytest
import torch
from torchvision import transforms as T

from moco_transfer.augment import GaussianBlur, TwoCrops, eval_transform, moco_v1_augmentation, moco_v2_augmentation
from moco_transfer.data import DataError, DigitsDataset, ImageFolderDataset, collate_with_skips, resolve_split

from .conftest import write_class_folders


def _find(compose: T.Compose, kind: type) -> list:
    found = []
    for t in compose.transforms:
        if isinstance(t, kind):
            found.append(t)
        if isinstance(t, T.RandomApply):
            found += [(t.p, inner) for inner in t.transforms if isinstance(inner, kind)]
    return found


def test_aug_plus_parameters():
    aug = moco_v2_augmentation(224)
    crop = _find(aug, T.RandomResizedCrop)[0]
    assert crop.size == (224, 224) and crop.scale == (0.2, 1.0)
    p, jitter = _find(aug, T.ColorJitter)[0]
    assert p == 0.8
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1))
    assert _find(aug, T.RandomGrayscale)[0].p == 0.2
    p, blur = _find(aug, GaussianBlur)[0]
    assert p == 0.5 and blur.sigma == (0.1, 2.0)
    assert _find(aug, T.RandomHorizontalFlip)[0].p == 0.5
    norm = _find(aug, T.Normalize)[0]
    assert norm.mean == (0.485, 0.456, 0.406) and norm.std == (0.229, 0.224, 0.225)


def test_v1_augmentation_has_no_blur_and_full_jitter():
    aug = moco_v1_augmentation(224)
    assert not _find(aug, GaussianBlur)
    jitter = _find(aug, T.ColorJitter)[0]
    assert isinstance(jitter, T.ColorJitter) and jitter.hue == (-0.4, 0.4)


def test_blur_sigma_range_and_determinism():
    img = DigitsDataset("val", image_size=32)[0][0]
    torch.manual_seed(3)
    a = T.functional.pil_to_tensor(GaussianBlur((1.5, 2.0))(img))
    torch.manual_seed(3)
    b = T.functional.pil_to_tensor(GaussianBlur((1.5, 2.0))(img))
    assert torch.equal(a, b) and not torch.equal(a, T.functional.pil_to_tensor(img))


def test_two_crops_are_independent_views():
    img = DigitsDataset("train", image_size=32)[0][0]
    q, k = TwoCrops(moco_v2_augmentation(32))(img)
    assert q.shape == k.shape == (3, 32, 32) and not torch.equal(q, k)


def test_eval_transform_scales_resize_with_crop():
    t = eval_transform(224)
    assert t.transforms[0].size == 256 and t.transforms[1].size == (224, 224)
    assert eval_transform(32).transforms[0].size == 37


def test_digits_split_is_fixed_and_disjoint():
    train, val = DigitsDataset("train"), DigitsDataset("val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert sorted(set(train.targets)) == list(range(10))
    assert DigitsDataset("val").targets == val.targets
    with pytest.raises(ValueError, match="embedded split 'test'"):
        DigitsDataset("test")


def test_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        resolve_split(tmp_path / "missing", "train")
    with pytest.raises(DataError, match="no val/ folder"):
        resolve_split(tmp_path, "val", required=True)
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no images in its 1 class folders"):
        ImageFolderDataset(tmp_path)


def test_corrupt_images_are_replaced_and_reported(tmp_path):
    write_class_folders(tmp_path, classes=2, per_class=4)
    (tmp_path / "class_0" / "img_001.png").write_bytes(b"not an image")
    good = (tmp_path / "class_1" / "img_000.png").read_bytes()
    (tmp_path / "class_1" / "img_002.png").write_bytes(good[: len(good) // 3])  # truncated
    ds = ImageFolderDataset(tmp_path, transform=T.ToTensor())
    assert len(ds) == 8
    items = [ds[i] for i in range(len(ds))]
    bad = [p for _, _, b in items for p in b]
    assert len(bad) == 2
    assert any("class_0/img_001.png" in p for p in bad) and any("class_1/img_002.png" in p for p in bad)
    samples, targets, reported = collate_with_skips(items)
    assert samples.shape == (8, 3, 24, 24) and targets.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert len(reported) == 2


@pytest.mark.parametrize("make", [moco_v2_augmentation, moco_v1_augmentation])
def test_flip_false_drops_only_the_mirror(make):
    with_flip, without = make(16), make(16, flip=False)
    assert _find(with_flip, T.RandomHorizontalFlip) and not _find(without, T.RandomHorizontalFlip)
    assert len(with_flip.transforms) == len(without.transforms) + 1


def test_small_crops_scale_blur_and_take_crop_min():
    aug = moco_v2_augmentation(16, crop_min=0.5)
    assert _find(aug, T.RandomResizedCrop)[0].scale == (0.5, 1.0)
    _, blur = _find(aug, GaussianBlur)[0]
    assert blur.sigma == pytest.approx((0.1 * 16 / 224, 2.0 * 16 / 224))
    assert _find(moco_v1_augmentation(16, crop_min=0.3), T.RandomResizedCrop)[0].scale == (0.3, 1.0)


@pytest.mark.parametrize("workers", [0, 1], ids=["-j 0", "-j 1"])
def test_every_batch_of_an_epoch_is_drawn_the_same_however_the_epoch_is_reached(tmp_path, workers):
    """CPU pipeline: epoch 2 after epochs 0 and 1 equals epoch 2 of a fresh loader (a resumed run), batch for
    batch, views and order; with a loader worker the views are drawn there, seeded from the loader."""
    from moco_transfer.pretrain.config import resolve_config
    from moco_transfer.pretrain.data import build_pretrain_dataset, build_pretrain_loader, seed_epoch

    data = write_class_folders(tmp_path / "data", classes=2, per_class=12)  # 24 images: 3 batches of 8
    cfg = resolve_config("mocov2", overrides={"data": str(data), "output": str(tmp_path / "out"), "image_size": 16,
                                              "batch_size": 8, "moco_k": 32, "workers": workers,
                                              "data_pipeline": "cpu", "device": "cpu", "seed": 5})
    cpu = torch.device("cpu")

    def epoch(loader, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        seed_epoch(loader, cfg.seed, index)
        return [(torch.stack(list(views)), targets) for views, targets, _ in loader]

    running = build_pretrain_loader(cfg, build_pretrain_dataset(cfg, cpu), cpu)
    epochs = [epoch(running, i) for i in range(3)]
    resumed = epoch(build_pretrain_loader(cfg, build_pretrain_dataset(cfg, cpu), cpu), 2)
    assert len(epochs[2]) == len(resumed) == 3
    for (views, targets), (views_again, targets_again) in zip(epochs[2], resumed, strict=True):
        assert torch.equal(views, views_again) and torch.equal(targets, targets_again)
    assert not torch.equal(views[0], views[1])  # the two views are two draws
    for other in epochs[:2]:  # other epochs draw other views
        assert not any(torch.equal(a[0], b[0]) for a, b in zip(other, epochs[2], strict=True))
