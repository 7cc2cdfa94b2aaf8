"""The online linear probe: it learns, it changes nothing MoCo learns, it is saved apart from the official keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from moco_transfer.augment import eval_transform
from moco_transfer.checkpoint import load_checkpoint
from moco_transfer.pretrain.config import ConfigError, resolve_config
from moco_transfer.pretrain.engine import run_pretraining
from moco_transfer.pretrain.online_probe import CHECKPOINT_KEY
from moco_transfer.pretrained import load_pretrained_backbone

from .conftest import write_class_folders

TINY = dict(arch="resnet18", small_images=True, image_size=16, batch_size=8, moco_k=32, bn_splits=2,
            workers=0, epochs=3, moco_m=0.99, seed=5, tensorboard=False)


def _cfg(data: Path, out: Path, **kw):
    return resolve_config("mocov2", overrides={**TINY, "data": str(data), "output": str(out), **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 colour-and-stripe classes, 16 images each: 8 steps of 8 per epoch; chance is 25%."""
    return write_class_folders(tmp_path_factory.mktemp("four") / "train", classes=4, per_class=16, size=20)


@pytest.fixture(scope="module")
def with_and_without(four_classes, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("probe_runs")
    run_pretraining(_cfg(four_classes, root / "with"))  # the default: on, since the folders have labels
    run_pretraining(_cfg(four_classes, root / "without", online_probe=False))
    return root / "with", root / "without"


def test_the_probe_learns_well_above_chance(with_and_without, four_classes):
    tops = [r["online_probe_top1"] for r in _log(with_and_without[0])]
    assert all(0.0 <= t <= 100.0 for t in tops)
    # On the training stream each batch is scored before the probe trains on it, on augmented views (colour
    # jitter, 20% grayscale: the classes' colours are only partly there): chance is 25%.
    assert tops[-1] >= 40.0, tops
    # The saved probe on the encoder's features of the clean images (centre crops, BN with its running stats).
    ckpt = with_and_without[0] / "checkpoint_0002.pth.tar"
    backbone = load_pretrained_backbone(ckpt, torch.device("cpu")).model.eval()
    state = load_checkpoint(ckpt)[CHECKPOINT_KEY]["module"]
    norm, fc = torch.nn.BatchNorm1d(512, affine=False).eval(), torch.nn.Linear(512, 4)
    norm.load_state_dict({k[len("norm."):]: v for k, v in state.items() if k.startswith("norm.")})
    fc.load_state_dict({k[len("fc."):]: v for k, v in state.items() if k.startswith("fc.")})
    paths = sorted(four_classes.glob("class_*/*.png"))
    images = torch.stack([eval_transform(16)(Image.open(p).convert("RGB")) for p in paths])
    labels = torch.tensor([int(p.parent.name.split("_")[1]) for p in paths])
    with torch.no_grad():
        accuracy = (fc(norm(backbone(images))).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.7, accuracy  # measured 0.81


def test_the_probe_changes_nothing_moco_learns(with_and_without):
    probed, plain = with_and_without
    a, b = _log(probed), _log(plain)
    assert "online_probe_top1" not in b[0]
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["acc1"] == pytest.approx(rb["acc1"], abs=1e-6)
    sa = load_checkpoint(probed / "checkpoint_0002.pth.tar")
    sb = load_checkpoint(plain / "checkpoint_0002.pth.tar")
    assert sa["state_dict"].keys() == sb["state_dict"].keys()  # the official layout, no probe keys in it
    for k, v in sa["state_dict"].items():
        assert torch.allclose(v.float(), sb["state_dict"][k].float(), atol=1e-6), k
    assert CHECKPOINT_KEY in sa and CHECKPOINT_KEY not in sb
    probe = sa[CHECKPOINT_KEY]
    assert probe["num_classes"] == 4 and probe["module"]["fc.weight"].shape == (4, 512)
    assert probe["module"]["fc.weight"].abs().sum() > 0  # it trained


def test_the_probe_is_in_the_curves_and_in_the_report(with_and_without):
    from moco_transfer.eval.report import build_report

    report = build_report([with_and_without[0]])
    assert "online probe top-1" in report.markdown
    last = _log(with_and_without[0])[-1]["online_probe_top1"]
    assert f"{last:.1f}" in report.markdown


def test_asking_for_the_probe_on_unlabelled_data_is_an_error(tmp_path):
    flat = tmp_path / "flat"
    for path in write_class_folders(tmp_path / "src", classes=1, per_class=16).glob("*/*.png"):
        flat.mkdir(exist_ok=True)
        path.rename(flat / path.name)
    with pytest.raises(ConfigError, match=r"--online-probe: --data .*flat has no class labels"):
        run_pretraining(_cfg(flat, tmp_path / "run", online_probe=True, epochs=1))
    run_pretraining(_cfg(flat, tmp_path / "run2", epochs=1))  # the default leaves it off there
    assert "online_probe_top1" not in _log(tmp_path / "run2")[0]
