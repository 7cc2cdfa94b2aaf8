"""Conversion round trips: this project's checkpoints and official-release-like ones, to detectron2 and torchvision."""

from __future__ import annotations

import pickle
import re
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from moco_transfer.backbone import RESNET_ARCHS, build_resnet
from moco_transfer.builder import MoCo
from moco_transfer.checkpoint import CheckpointError, with_module_prefix
from moco_transfer.cli import main
from moco_transfer.convert import (
    convert,
    detectron2_name,
    infer_arch,
    load_backbone,
    read_detectron2_weights,
)


@pytest.fixture(scope="module")
def moco_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MoCo(partial(build_resnet, "resnet50"), dim=128, K=256, mlp=True)
    # Distinct values in every BN buffer, so a swapped name would show up as a value mismatch.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    return with_module_prefix(model.state_dict())


@pytest.fixture(scope="module")
def project_ckpt(tmp_path_factory, moco_state):
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_0001.pth.tar"
    torch.save({"epoch": 2, "arch": "resnet50", "state_dict": moco_state, "optimizer": {}, "config": {"lr": 0.03}},
               path)
    return path


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory, moco_state):
    """Laid out like the released files: only module.encoder_q.* (head included), no encoder_k, no queue."""
    path = tmp_path_factory.mktemp("official") / "moco_v2_200ep_pretrain.pth.tar"
    sd = {k: v for k, v in moco_state.items() if k.startswith("module.encoder_q.")}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {}}, path)
    return path


# Expected names written independently of the converter's regexes: the detectron2 ResNet layout.
def _expected_d2_names() -> set[str]:
    names = set()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    names.add("stem.conv1.weight")
    names |= {f"stem.conv1.norm.{s}" for s in bn}
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            for c in (1, 2, 3):
                names.add(f"res{stage}.{b}.conv{c}.weight")
                names |= {f"res{stage}.{b}.conv{c}.norm.{s}" for s in bn}
        names.add(f"res{stage}.0.shortcut.weight")
        names |= {f"res{stage}.0.shortcut.norm.{s}" for s in bn}
    return names


@pytest.mark.parametrize("which", ["project_ckpt", "official_ckpt"])
def test_detectron2_round_trip(which, request, tmp_path, moco_state):
    src = request.getfixturevalue(which)
    out = tmp_path / "d2.pkl"
    summary = convert(src, out, target="detectron2")
    with open(out, "rb") as f:
        raw = pickle.load(f)  # our own file, written by this test
    assert raw["__author__"] == "MOCO" and raw["matching_heuristics"] is True
    model = raw["model"]
    assert set(model) == _expected_d2_names()
    assert all(isinstance(v, np.ndarray) for v in model.values())
    # every backbone tensor under the right name with identical values
    q = {k.removeprefix("module.encoder_q."): v for k, v in moco_state.items() if k.startswith("module.encoder_q.")}
    backbone = {k: v for k, v in q.items() if not k.startswith("fc.")}
    assert len(backbone) == len(model) == summary.tensors == 318
    spot = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer1.0.downsample.1.bias": "res2.0.shortcut.norm.bias",
        "layer3.5.bn2.running_mean": "res4.5.conv2.norm.running_mean",
        "layer4.2.conv3.weight": "res5.2.conv3.weight",
    }
    for tv, d2 in spot.items():
        np.testing.assert_array_equal(model[d2], backbone[tv].numpy())
    for tv, value in backbone.items():
        np.testing.assert_array_equal(model[detectron2_name(tv)], value.numpy())
    assert summary.skipped_head == ["fc.0.bias", "fc.0.weight", "fc.2.bias", "fc.2.weight"]
    assert summary.parameters == sum(p.numel() for p in torchvision.models.resnet50().parameters()) - 2048 * 1000 - 1000
    # the safe reader (used by `moco eval voc` for .pkl inputs) returns the same thing
    again = read_detectron2_weights(out)
    assert set(again["model"]) == set(model)


def test_torchvision_loads_strict_apart_from_fc(project_ckpt, tmp_path, moco_state):
    out = tmp_path / "tv.pth"
    summary = convert(project_ckpt, out, target="torchvision")
    assert summary.missing_in_target == ["fc.weight", "fc.bias"]
    sd = torch.load(out, weights_only=True)
    net = torchvision.models.resnet50()
    result = net.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(net.layer4[2].bn3.running_var, moco_state["module.encoder_q.layer4.2.bn3.running_var"],
                               rtol=0, atol=0)
    torch.testing.assert_close(net.conv1.weight, moco_state["module.encoder_q.conv1.weight"], rtol=0, atol=0)


def test_refuses_overwrite_without_force(project_ckpt, tmp_path):
    out = tmp_path / "d2.pkl"
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert(project_ckpt, out)
    assert out.read_bytes() == b"keep me"
    convert(project_ckpt, out, force=True)
    assert out.read_bytes() != b"keep me"


def test_not_a_moco_checkpoint(tmp_path):
    bad = tmp_path / "classifier.pth"
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    with pytest.raises(CheckpointError, match=re.escape("module.encoder_q.")):
        convert(bad, tmp_path / "o.pkl")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a loadable PyTorch file"):
        convert(text, tmp_path / "o.pkl")
    assert not (tmp_path / "o.pkl").exists()


def test_missing_backbone_keys_are_named(moco_state, tmp_path):
    sd = {k: v for k, v in moco_state.items() if not k.startswith("module.encoder_q.layer4.")}
    path = tmp_path / "partial.pth.tar"
    torch.save({"arch": "resnet50", "state_dict": sd}, path)
    with pytest.raises(CheckpointError, match=r"\d+ missing \(e\.g\. layer4\.0\."):
        convert(path, tmp_path / "o.pkl")


def test_small_image_stem_is_a_shape_error(tmp_path):
    model = MoCo(partial(build_resnet, "resnet18", small_images=True), dim=16, K=32)
    path = tmp_path / "cifar.pth.tar"
    torch.save({"arch": "resnet18", "state_dict": with_module_prefix(model.state_dict())}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e\.g\. conv1\.weight"):
        load_backbone(path)


def test_arch_inferred_without_arch_entry(moco_state, tmp_path):
    path = tmp_path / "noarch.pth.tar"
    torch.save({"state_dict": {k: v for k, v in moco_state.items() if "encoder_q" in k}}, path)
    assert load_backbone(path).arch == "resnet50"
    r18 = torchvision.models.resnet18().state_dict()
    assert infer_arch(r18) == "resnet18"


@pytest.mark.parametrize("small_images", [False, True])
def test_infer_arch_names_every_supported_arch(small_images):
    """Each arch the project builds is named from its shapes alone: resnext50_32x4d and wide_resnet50_2 are not
    resnet50, and a small-image stem (3x3 conv1, no max-pool) does not change the answer."""
    for arch in RESNET_ARCHS:
        with torch.device("meta"):  # shapes only: no memory, no init
            model = getattr(torchvision.models, arch)()
            if small_images:
                model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
        assert infer_arch(state) == arch, arch
    assert infer_arch({"conv1.weight": torch.zeros(64, 3, 7, 7)}) is None


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(path, "wb") as f:
        pickle.dump({"model": {"x": Boom()}}, f)
    with pytest.raises(CheckpointError, match="refusing to unpickle builtins.print"):
        read_detectron2_weights(path)


def test_cli_convert(project_ckpt, tmp_path):
    out = tmp_path / "r50.pkl"
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(project_ckpt), str(out), "--to", "detectron2"])
    assert res.exit_code == 0, res.output
    assert "tensors written: 318" in res.output and "skipped head keys (4)" in res.output
    res = runner.invoke(main, ["convert", str(project_ckpt), str(out)])
    assert res.exit_code != 0 and "--force" in res.output
    res = runner.invoke(main, ["convert", str(project_ckpt), str(tmp_path / "tv.pth"), "--to", "torchvision"])
    assert res.exit_code == 0 and "fc.weight, fc.bias" in res.output
    res = runner.invoke(main, ["convert", str(tmp_path / "nope.pth"), str(tmp_path / "x.pkl")])
    assert res.exit_code != 0 and "file not found" in res.output
