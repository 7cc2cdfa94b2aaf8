"""Named sets (`--data cifar10`, ...) read from tiny files in their real formats, written by the tests.

References: the arrays the writers were given, and torchvision's own dataset classes reading the same files.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from moco_transfer import named_sets
from moco_transfer.data import DataError, make_datasets
from moco_transfer.named_sets import (
    DEBIAN_FASHION_MNIST,
    ArrayImages,
    data_defaults,
    data_root,
    load_named_split,
    read_idx,
)
from moco_transfer.pretrain.config import resolve_config
from moco_transfer.pretrained import pretrained_on_embedded

from . import named_set_files as files


@pytest.fixture(autouse=True)
def _restore_data_defaults():
    """The CLI's --data-root/--download callbacks set process-wide defaults: keep them out of other tests."""
    with data_defaults():
        yield


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """One data root with every named set, MNIST as plain IDX files and Fashion-MNIST gzipped."""
    root = tmp_path_factory.mktemp("datasets")
    written = {
        "cifar10": files.write_cifar10(root),
        "cifar100": files.write_cifar100(root),
        "stl10": files.write_stl10(root),
        "mnist": files.write_mnist_like(root / "MNIST" / "raw", gz=False),
        "fashion-mnist": files.write_mnist_like(root / "FashionMNIST" / "raw", gz=True, seed=50),
        "svhn": files.write_svhn(root / "svhn"),
    }
    return root, written


def _rgb(images: np.ndarray) -> np.ndarray:
    """What an RGB view of the written images is: grayscale repeated on the three channels."""
    return np.repeat(images[..., None], 3, axis=3) if images.ndim == 3 else images


def _pixels(dataset: ArrayImages) -> np.ndarray:
    return np.stack([np.asarray(dataset.load(i)) for i in range(len(dataset))])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "fashion-mnist", "mnist", "svhn"])
def test_each_named_set_gives_the_written_pixels_labels_and_splits(sets, name):
    root, written = sets
    for split in ("train", "test"):
        images, labels = written[name][split]
        dataset = ArrayImages(load_named_split(name, split, root))
        assert len(dataset) == len(images)
        assert np.array_equal(_pixels(dataset), _rgb(images)), (name, split)
        assert dataset.targets == labels.tolist()
        assert dataset.load(0).mode == "RGB" and dataset.load(0).size == images.shape[2:0:-1]
        assert len(dataset.classes) == (100 if name == "cifar100" else 10)
    if "classes" in written[name]:
        assert dataset.classes == written[name]["classes"]  # from the set's own meta / class_names.txt
    pretrain = load_named_split(name, "pretrain", root)
    train_x, train_y = written[name]["train"]
    if name == "stl10":  # train + unlabeled, as torchvision's "train+unlabeled" split
        unlabeled = written[name]["unlabeled"][0]
        assert np.array_equal(_pixels(ArrayImages(pretrain)), np.concatenate([train_x, unlabeled]))
        assert pretrain.targets.tolist() == train_y.tolist() + [-1] * len(unlabeled)
    else:
        assert np.array_equal(_pixels(ArrayImages(pretrain)), _rgb(train_x))
        assert pretrain.targets.tolist() == train_y.tolist()


def test_torchvision_reads_the_written_files_as_the_loaders_do(sets, monkeypatch):
    """The writers' layouts are torchvision's: its classes (checksums off, the files are not the real ones) give
    the same images and labels as the loaders here. Fashion-MNIST is gzipped, which torchvision does not read."""
    import torchvision.datasets as tvd
    from torchvision.datasets import cifar, stl10, svhn

    for module in (cifar, stl10, svhn):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)
    root, _ = sets
    theirs = {
        ("cifar10", "train"): tvd.CIFAR10(root, train=True), ("cifar10", "test"): tvd.CIFAR10(root, train=False),
        ("cifar100", "train"): tvd.CIFAR100(root, train=True), ("cifar100", "test"): tvd.CIFAR100(root, train=False),
        ("stl10", "pretrain"): tvd.STL10(root, split="train+unlabeled"), ("stl10", "test"): tvd.STL10(root, "test"),
        ("svhn", "train"): tvd.SVHN(root / "svhn", "train"), ("svhn", "test"): tvd.SVHN(root / "svhn", "test"),
        ("mnist", "train"): tvd.MNIST(root, train=True), ("mnist", "test"): tvd.MNIST(root, train=False),
    }
    for (name, split), reference in theirs.items():
        ours = ArrayImages(load_named_split(name, split, root))
        assert len(ours) == len(reference), (name, split)
        for i in range(len(ours)):
            image, target = reference[i]
            assert np.array_equal(np.asarray(ours.load(i)), np.asarray(image.convert("RGB"))), (name, split, i)
            assert ours.targets[i] == int(target), (name, split, i)
        if name in ("cifar10", "cifar100", "stl10"):
            assert ours.classes == reference.classes


def test_svhn_files_directly_in_the_root_are_found_too(tmp_path):
    written = files.write_svhn(tmp_path)  # torchvision's SVHN(root) keeps them in the root itself
    split = load_named_split("svhn", "test", tmp_path)
    assert split.folder == tmp_path and split.targets.tolist() == written["test"][1].tolist()


def test_make_datasets_pairs_train_with_test_and_applies_the_transforms(sets):
    root, written = sets
    to_tensor = lambda image: torch.from_numpy(np.asarray(image).copy())  # noqa: E731
    pair = make_datasets("mnist", to_tensor, to_tensor, 28, data_root=root)
    assert (len(pair.train), len(pair.val)) == (7, 3) and pair.classes == [str(i) for i in range(10)]
    image, target, bad = pair.val[2]
    assert image.shape == (28, 28, 3) and bad == ()
    assert torch.equal(image[..., 1], torch.from_numpy(written["mnist"]["test"][0][2]))
    assert target == written["mnist"]["test"][1][2]
    assert pair.root.startswith("mnist:") and str(root) in pair.root


def test_a_missing_file_is_one_line_naming_the_files_their_folder_and_download(tmp_path):
    files.write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError) as raised:
        load_named_split("cifar10", "train", tmp_path)
    message = str(raised.value)
    assert "\n" not in message and "data_batch_3" in message and "data_batch_1" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "--download" in message
    with pytest.raises(DataError, match=r"missing train_32x32\.mat in .*svhn.*--download"):
        load_named_split("svhn", "train", tmp_path)
    with pytest.raises(DataError, match=r"missing t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte \(plain or \.gz\)"):
        load_named_split("mnist", "test", tmp_path)
    # the command line says the same, as a usage error
    result = CliRunner().invoke(_cli_main(), ["pretrain", "--data", "cifar10", "--data-root", str(tmp_path),
                                              "-o", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "--data cifar10: missing data_batch_3" in result.output, result.output


def _cli_main():
    from moco_transfer.cli import main

    return main


def test_download_goes_through_torchvision_and_only_when_asked(tmp_path, monkeypatch):
    calls = []

    class FakeCIFAR10:  # what torchvision's class does with download=True: fetch and unpack into root
        def __init__(self, root: str, download: bool, train: bool) -> None:
            calls.append((root, download, train))
            files.write_cifar10(Path(root))

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    with pytest.raises(DataError, match="--download"):
        load_named_split("cifar10", "train", tmp_path)
    assert calls == []
    split = load_named_split("cifar10", "test", tmp_path, download=True)
    assert len(split.images) == 5 and calls == [(str(tmp_path), True, True), (str(tmp_path), True, False)]
    with data_defaults(download=True):  # --download on the command line sets this for the process
        load_named_split("cifar10", "train", tmp_path)
    assert len(calls) == 2  # the files are there now: nothing more to download

    def offline(root: str, download: bool, train: bool) -> None:
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match=r"torchvision could not download it into .*Network is unreachable"):
        load_named_split("cifar10", "train", tmp_path / "elsewhere", download=True)


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv(named_sets.DATA_ROOT_ENV, raising=False)
    assert data_root() == named_sets.DEFAULT_DATA_ROOT.expanduser()
    monkeypatch.setenv(named_sets.DATA_ROOT_ENV, str(tmp_path / "env"))
    assert data_root() == tmp_path / "env"
    with data_defaults(root=tmp_path / "option"):
        assert data_root() == tmp_path / "option"
        assert data_root(tmp_path / "given") == tmp_path / "given"
    assert data_root() == tmp_path / "env"


def test_broken_files_are_named(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    data = files.idx_bytes(np.zeros((4, 5, 5), np.uint8))
    import gzip

    path.write_bytes(gzip.compress(data[:-7]))
    with pytest.raises(DataError, match=r"x-idx3-ubyte\.gz: 93 bytes of data, 100 expected"):
        read_idx(path)
    (tmp_path / "plain").write_bytes(b"\x08\x03" + data[2:])
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "plain")
    folder = tmp_path / "cifar-10-batches-py"
    files.write_cifar10(tmp_path)

    class Payload:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Payload()}, protocol=2))
    with pytest.raises(DataError, match=r"test_batch: not a CIFAR python batch .*\.print is not allowed"):
        load_named_split("cifar10", "test", tmp_path)


def test_named_sets_take_the_published_recipe_and_are_the_evaluators_default(tmp_path):
    assert resolve_config(overrides={"data": "cifar10"}).preset == "mocov2"  # as a folder, not the embedded preset
    assert resolve_config("mocov1", overrides={"data": "cifar10"}).preset == "mocov1"
    assert resolve_config().preset == "scattered-digits"
    assert pretrained_on_embedded({"data": "stl10", "preset": "mocov2"}) == "stl10"
    assert pretrained_on_embedded({"data": "embedded:digits"}) == "embedded:digits"
    assert pretrained_on_embedded({"data": str(tmp_path)}) is None  # a folder: --data must be given


def test_eval_knn_defaults_to_the_checkpoints_named_set_under_data_root(sets, tmp_path):
    """A checkpoint pretrained with `--data cifar10` is evaluated on cifar10 (train gallery, test queries) from
    the `--data-root` given to the evaluator."""
    import json

    from moco_transfer.pretrain.engine import build_model

    root, written = sets
    cfg = resolve_config(overrides={"data": "cifar10", "arch": "resnet18", "small_images": True, "image_size": 32,
                                    "batch_size": 8, "moco_k": 32})
    state = {f"module.{k}": v for k, v in build_model(cfg).state_dict().items()}
    ckpt = tmp_path / "checkpoint_0000.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state, "config": cfg.to_dict()}, ckpt)
    result = CliRunner().invoke(_cli_main(), ["eval", "knn", str(ckpt), "--data-root", str(root), "-o",
                                              str(tmp_path / "knn"), "--no-cache", "-j", "0", "--device", "cpu",
                                              "--k", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "knn" / "knn.json").read_text())
    assert report["data"].startswith("cifar10:") and (report["num_train"], report["num_val"]) == (20, 5)
    assert report["num_classes"] == 10


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_debians_package(tmp_path):
    """With nothing under the data root, Fashion-MNIST is read from Debian's gzipped files."""
    for split, n in (("train", 60000), ("test", 10000)):
        found = load_named_split("fashion-mnist", split, tmp_path)
        assert found.folder == DEBIAN_FASHION_MNIST
        assert found.images.shape == (n, 1, 28, 28) and found.images.dtype == np.uint8
        assert np.bincount(found.targets, minlength=10).tolist() == [n // 10] * 10
        assert found.images.min() == 0 and found.images.max() == 255
        assert 60 < found.images.mean() < 80  # the set's mean pixel is about 72.9 (train) and 73.1 (test)
    image = ArrayImages(found).load(0)
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], np.asarray(Image.fromarray(found.images[0, 0])))
