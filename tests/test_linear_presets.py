"""`moco eval linear` defaults that fit the checkpoint: a preset's measured settings, else the ImageNet protocol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from moco_transfer.cli import main
from moco_transfer.eval.linear import LinearConfig, resolve_settings
from moco_transfer.pretrain.config import PRESETS
from moco_transfer.pretrained import PRESET_LINEAR, preset_linear_settings

from .eval_helpers import make_checkpoint, make_image_folder

EMBEDDED = PRESET_LINEAR["scattered-digits"]


def with_config(path: Path, **config: Any) -> Path:
    """A tiny checkpoint whose pretraining config also records these fields (preset, data)."""
    make_checkpoint(path, image_size=16)
    state = torch.load(path, weights_only=True)
    state["config"].update(config)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("presets") / "data", per_class=4)


def linear(ckpt: Path, data: Path, out: Path, *options: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["eval", "linear", str(ckpt), "--data", str(data), "-o", str(out), "--cached",
                                       "--no-cache", "-j", "0", *options])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "linear.json").read_text())
    assert f"settings: lr {report['lr']:g}, {report['hyperparameters']['epochs']} epochs" in result.output
    return report


def test_checkpoint_of_the_embedded_preset_gets_its_linear_settings(tmp_path: Path, data: Path) -> None:
    ckpt = with_config(tmp_path / "ck.pth.tar", preset="scattered-digits", data="embedded:scattered-digits")
    report = linear(ckpt, data, tmp_path / "default")
    assert report["lr"] == pytest.approx(EMBEDDED.lr) and EMBEDDED.lr < 30  # not the ImageNet protocol's 30
    assert report["hyperparameters"]["epochs"] == EMBEDDED.epochs == len(report["history"])
    assert report["settings"] == EMBEDDED.describe()
    # the preset's lr is per 256 images, scaled with the batch like the protocol's
    assert linear(ckpt, data, tmp_path / "b64", "-b", "64")["lr"] == pytest.approx(EMBEDDED.lr * 64 / 256)
    # explicit options still win, each on its own
    given = linear(ckpt, data, tmp_path / "lr", "--lr", "0.5")
    assert given["lr"] == 0.5 and given["hyperparameters"]["epochs"] == EMBEDDED.epochs
    assert given["settings"] == EMBEDDED.describe() + ", lr as given"
    short = linear(ckpt, data, tmp_path / "ep", "--epochs", "3")
    assert short["lr"] == pytest.approx(EMBEDDED.lr) and len(short["history"]) == 3


def test_checkpoint_without_a_measured_preset_keeps_the_imagenet_protocol(tmp_path: Path, data: Path) -> None:
    plain = make_checkpoint(tmp_path / "plain.pth.tar", image_size=16)  # config names no preset
    report = linear(plain, data, tmp_path / "plain", "--epochs", "2")
    assert report["lr"] == 30.0 and report["settings"].startswith("the ImageNet protocol")
    # the preset's name alone is not enough: a run of it on other data has features of another scale
    elsewhere = with_config(tmp_path / "other.pth.tar", preset="scattered-digits", data="/datasets/imagenet")
    assert linear(elsewhere, data, tmp_path / "other", "--epochs", "2")["lr"] == 30.0
    mocov2 = with_config(tmp_path / "v2.pth.tar", preset="mocov2", data="/datasets/imagenet")
    assert linear(mocov2, data, tmp_path / "v2", "--epochs", "2")["lr"] == 30.0


def test_resolve_settings() -> None:
    cfg, origin = resolve_settings(LinearConfig(mode="cached", batch_size=512))
    assert (cfg.lr, cfg.epochs) == (60.0, 100) and "ImageNet protocol" in origin
    cfg, origin = resolve_settings(LinearConfig(mode="cached", lr=1.0, epochs=7), EMBEDDED)
    assert (cfg.lr, cfg.epochs, origin) == (1.0, 7, "lr and epochs as given")
    assert resolve_settings(cfg, EMBEDDED)[0] == cfg  # a resolved config stays as it is
    lbfgs, origin = resolve_settings(LinearConfig(mode="lbfgs"), EMBEDDED)
    assert (lbfgs.lr, lbfgs.epochs) == (None, None) and "no lr or epochs" in origin  # nothing SGD-only recorded


def test_preset_linear_settings_name_real_presets_and_their_data() -> None:
    for name, settings in PRESET_LINEAR.items():
        assert settings.preset == name and PRESETS[name]["data"] == settings.data
        assert preset_linear_settings({"preset": name, "data": settings.data}) is settings
    assert preset_linear_settings({}) is None
    assert preset_linear_settings({"preset": "scattered-digits", "data": None}) is None
