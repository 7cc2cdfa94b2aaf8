"""Backbone loading from checkpoints, feature extraction, the feature cache, and the dataset pair checks."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moco_transfer.augment import eval_transform
from moco_transfer.backbone import build_resnet
from moco_transfer.builder import MoCo
from moco_transfer.checkpoint import CheckpointError
from moco_transfer.data import DataError, ImageFolderDataset, make_datasets
from moco_transfer.eval.common import backbone_features
from moco_transfer.feature_cache import FeatureCache, cache_key, samples_signature
from moco_transfer.features import extract_features, feature_loader
from moco_transfer.pretrained import load_pretrained_backbone

try:  # tests/ is a package in this repository; run as loose files otherwise
    from .eval_helpers import make_checkpoint, make_image_folder
except ImportError:
    from eval_helpers import make_checkpoint, make_image_folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_0000.pth.tar", image_size=16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=4)


def test_project_checkpoint_loads_query_encoder_frozen(ckpt: Path) -> None:
    pb = load_pretrained_backbone(ckpt)
    assert (pb.arch, pb.small_images, pb.image_size, pb.feature_dim, pb.epoch) == ("resnet18", True, 16, 512, 1)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    got = pb.model.state_dict()
    assert torch.equal(got["layer4.1.conv2.weight"], state["module.encoder_q.layer4.1.conv2.weight"])
    assert torch.equal(got["bn1.running_var"], state["module.encoder_q.bn1.running_var"])
    assert not any(p.requires_grad for p in pb.model.parameters())
    assert not pb.model.training
    assert pb.model(torch.randn(2, 3, 16, 16)).shape == (2, 512)
    assert len(pb.fingerprint) == 64


def test_official_layout_without_config_or_arch(tmp_path: Path) -> None:
    """Official checkpoints: encoder_q only, no config; the 3x3 stem and the arch are read off the weights."""
    model = MoCo(partial(build_resnet, "resnet18", small_images=True), dim=128, K=256, mlp=True)
    sd = {f"module.{k}": v for k, v in model.state_dict().items() if k.startswith("encoder_q.")}
    torch.save({"arch": "resnet18", "state_dict": sd}, tmp_path / "official.pth.tar")
    pb = load_pretrained_backbone(tmp_path / "official.pth.tar")
    assert (pb.arch, pb.small_images, pb.image_size) == ("resnet18", True, 32)
    torch.save({"state_dict": sd}, tmp_path / "noarch.pth.tar")
    assert load_pretrained_backbone(tmp_path / "noarch.pth.tar").arch == "resnet18"


def test_missing_backbone_weight_is_an_error_naming_it(tmp_path: Path, ckpt: Path) -> None:
    obj = torch.load(ckpt, weights_only=True)
    del obj["state_dict"]["module.encoder_q.layer3.0.bn2.weight"]
    torch.save(obj, tmp_path / "partial.pth.tar")
    with pytest.raises(CheckpointError, match=r"missing.*layer3\.0\.bn2\.weight"):
        load_pretrained_backbone(tmp_path / "partial.pth.tar")


def test_non_moco_checkpoint_is_rejected(tmp_path: Path) -> None:
    torch.save({"state_dict": build_resnet("resnet18").state_dict()}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"no query-encoder keys.*module\.encoder_q"):
        load_pretrained_backbone(tmp_path / "plain.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_pretrained_backbone(tmp_path / "junk.pth")


def test_extract_features_order_labels_and_normalisation(ckpt: Path, folder: Path) -> None:
    pb = load_pretrained_backbone(ckpt)
    ds = ImageFolderDataset(folder / "val", eval_transform(16))
    feats, labels = extract_features(pb.model, feature_loader(ds, 5, 0), torch.device("cpu"), normalize=False)
    assert feats.shape == (12, 512) and labels.tolist() == ds.targets
    direct = pb.model(ds[7][0].unsqueeze(0))[0]
    assert torch.allclose(feats[7], direct, atol=1e-5)
    normed, _ = extract_features(pb.model, feature_loader(ds, 5, 0), torch.device("cpu"), normalize=True)
    assert torch.allclose(normed, F.normalize(feats, dim=1), atol=1e-6)


def test_cached_features_are_reused_and_keys_separate_inputs(tmp_path: Path, ckpt: Path, folder: Path) -> None:
    pb = load_pretrained_backbone(ckpt)
    pair = make_datasets(folder, eval_transform(16), eval_transform(16), 16)
    cache = FeatureCache(tmp_path / "cache")
    first = backbone_features(pb, pair, torch.device("cpu"), batch_size=8, workers=0, cache=cache)
    assert first.from_cache == {"train": False, "val": False} and len(list((tmp_path / "cache").glob("*.npz"))) == 2
    pb.model.forward = None  # a second extraction would now fail: the features must come from disk
    second = backbone_features(pb, pair, torch.device("cpu"), batch_size=8, workers=0, cache=cache)
    assert second.from_cache == {"train": True, "val": True}
    assert torch.equal(first.train_features, second.train_features)
    assert torch.equal(first.val_labels, second.val_labels)
    sig = samples_signature(pair.val)
    base = cache_key(pb.fingerprint, pair.root, "val", pair.val.transform, sig)
    assert base != cache_key("0" * 64, pair.root, "val", pair.val.transform, sig)
    assert base != cache_key(pb.fingerprint, pair.root, "train", pair.val.transform, sig)
    assert base != cache_key(pb.fingerprint, pair.root, "val", eval_transform(32), sig)
    assert base != cache_key(pb.fingerprint, "/elsewhere", "val", pair.val.transform, sig)


def test_corrupt_cache_file_is_recomputed(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    cache.path("k").write_bytes(b"truncated")
    feats, labels = cache.get_or_compute("k", lambda: (torch.ones(3, 2), torch.arange(3)))
    assert cache.misses == 1 and torch.equal(labels, torch.arange(3))
    again = cache.get_or_compute("k", lambda: (torch.zeros(1, 1), torch.zeros(1)))
    assert cache.hits == 1 and torch.equal(again[0], torch.ones(3, 2))


def test_missing_split_class_mismatch_and_empty_folder(tmp_path: Path) -> None:
    only_train = make_image_folder(tmp_path / "a", {"train": ["a", "b"]}, per_class=1)
    with pytest.raises(DataError, match=r"no val/ folder"):
        make_datasets(only_train, None, None, 16)
    mismatch = make_image_folder(tmp_path / "b", {"train": ["a", "b"], "val": ["a", "c"]}, per_class=1)
    with pytest.raises(DataError, match=r"same class(?:es| folders).*only in train: \['b'\], only in val: \['c'\]"):
        make_datasets(mismatch, None, None, 16)
    empty = make_image_folder(tmp_path / "c", {"train": ["a"]}, per_class=1)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"val: no images"):
        make_datasets(empty, None, None, 16)


def _sigterm_from_elsewhere(pid: int) -> None:
    """SIGTERM sent by another process than the worker's parent, as Slurm, torchrun's agent or timeout send it."""
    subprocess.run([sys.executable, "-c", f"import os, signal; os.kill({pid}, signal.SIGTERM)"], check=True)


def test_feature_loader_workers_outlive_a_stop_signal_to_the_job(folder: Path) -> None:
    """The kNN monitor extracts features inside pretraining, which saves and exits 75 on the job's SIGTERM; a
    worker dying of that signal would make the extraction raise before the save."""
    dataset = make_datasets(folder, eval_transform(16), eval_transform(16), 16).train
    loader = feature_loader(dataset, batch_size=2, workers=2)
    batches = iter(loader)
    labels = [next(batches)[1], next(batches)[1]]  # one batch from each worker: both are past their init
    for worker in batches._workers:
        _sigterm_from_elsewhere(worker.pid)
    time.sleep(0.3)
    labels += [batch[1] for batch in batches]  # PyTorch's own handler would have ended them: "killed by signal"
    assert torch.cat(labels).tolist() == dataset.targets


class FailsOnSecondBatch(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.calls = backbone, 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("out of memory")
        return self.backbone(images)


def test_extract_features_stops_its_workers_when_the_backbone_raises(ckpt: Path, folder: Path) -> None:
    dataset = make_datasets(folder, eval_transform(16), eval_transform(16), 16).train
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        extract_features(FailsOnSecondBatch(load_pretrained_backbone(ckpt).model),
                         feature_loader(dataset, batch_size=2, workers=2), torch.device("cpu"))
    assert raised.value is not None and multiprocessing.active_children() == []  # the traceback is still held
