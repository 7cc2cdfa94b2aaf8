"""Presets hold the published recipe; files and options merge in the documented order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moco_transfer.pretrain.config import PRESETS, ConfigError, PretrainConfig, resolve_config, save_resolved
from moco_transfer.schedule import lr_at_epoch


def test_mocov2_preset_is_the_official_recipe():
    cfg = resolve_config("mocov2")
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.effective_lr) == ("resnet50", 200, 256, 0.03)
    assert (cfg.momentum, cfg.weight_decay) == (0.9, 1e-4)
    assert (cfg.moco_dim, cfg.moco_k, cfg.moco_m, cfg.moco_t) == (128, 65536, 0.999, 0.2)
    assert cfg.mlp and cfg.aug_plus and cfg.cos
    assert cfg.image_size == 224 and not cfg.small_images


def test_mocov1_and_800ep_presets():
    v1 = resolve_config("mocov1")
    assert (v1.mlp, v1.aug_plus, v1.cos, v1.moco_t, v1.schedule, v1.epochs) == (
        False, False, False, 0.07, [120, 160], 200)
    assert resolve_config("mocov2-800ep").epochs == 800


@pytest.mark.parametrize("mlp,aug_plus,cos,t", [
    (False, False, False, 0.07), (True, False, False, 0.2), (False, True, False, 0.07),
    (True, True, False, 0.2), (True, True, True, 0.2), (True, False, False, 0.07),
])
def test_every_ablation_row_can_be_configured(mlp, aug_plus, cos, t):
    cfg = resolve_config("mocov1", overrides=dict(mlp=mlp, aug_plus=aug_plus, cos=cos, moco_t=t))
    assert (cfg.mlp, cfg.aug_plus, cfg.cos, cfg.moco_t) == (mlp, aug_plus, cos, t)


def test_lr_scales_linearly_with_batch_unless_given():
    assert resolve_config("mocov2", overrides={"batch_size": 128, "moco_k": 65536}).effective_lr == 0.015
    assert resolve_config("mocov2", overrides={"batch_size": 128, "lr": 0.05}).effective_lr == 0.05


def test_default_preset_depends_on_data(tmp_path):
    assert resolve_config().preset == "scattered-digits"
    assert resolve_config(overrides={"data": str(tmp_path)}).preset == "mocov2"
    assert resolve_config(overrides={"data": "embedded:digits"}).preset == "scattered-digits"
    for name in ("digits", "scattered-digits"):
        preset = PRESETS[name]
        assert preset["data"] == f"embedded:{name}" and preset["moco_k"] % preset["batch_size"] == 0


def test_embedded_preset_switches_and_their_defaults_elsewhere(tmp_path):
    """The embedded preset's departures from v2 are switches that stay off in the published presets."""
    embedded = resolve_config()
    assert (embedded.head_bn, embedded.flip, embedded.crop_min) == (True, False, 0.8)
    for name in ("mocov1", "mocov2", "mocov2-800ep"):
        cfg = resolve_config(name)
        assert (cfg.head_bn, cfg.flip, cfg.crop_min) == (False, True, 0.2), name
    assert resolve_config(overrides={"head_bn": False, "flip": True}).head_bn is False
    f = tmp_path / "run.yaml"
    f.write_text("flip: 'no'\n")
    with pytest.raises(ConfigError, match="'flip' must be true or false"):
        resolve_config(config_file=f)


def test_symmetric_needs_a_queue_of_whole_double_batches():
    assert resolve_config(overrides={"symmetric": True, "batch_size": 64, "moco_k": 1024}).symmetric
    with pytest.raises(ConfigError, match="--moco-k 192 must be a multiple of 2 x --batch-size = 128 with "
                                         "--symmetric"):
        resolve_config(overrides={"symmetric": True, "batch_size": 64, "moco_k": 192})


def test_schedules():
    assert lr_at_epoch(0.03, 0, 200, True, []) == 0.03
    assert lr_at_epoch(0.03, 100, 200, True, []) == pytest.approx(0.015)
    assert lr_at_epoch(0.03, 119, 200, False, [120, 160]) == 0.03
    assert lr_at_epoch(0.03, 120, 200, False, [120, 160]) == pytest.approx(0.003)
    assert lr_at_epoch(0.03, 160, 200, False, [120, 160]) == pytest.approx(0.0003)


def test_file_then_options_precedence_and_round_trip(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump({"preset": "mocov1", "epochs": 3, "moco-t": 0.1, "schedule": [1, 2]}))
    cfg = resolve_config(config_file=f, overrides={"epochs": 5})
    assert (cfg.preset, cfg.epochs, cfg.moco_t, cfg.schedule) == ("mocov1", 5, 0.1, [1, 2])
    saved = save_resolved(cfg, tmp_path / "out")
    again = resolve_config(config_file=saved)
    assert again == cfg
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"moco_k": 512, "batch_size": 64}))
    assert resolve_config("mocov2", config_file=j).moco_k == 512


@pytest.mark.parametrize("content,match", [
    ({"epochz": 3}, "unknown option"),
    ({"epochs": "many"}, "'epochs' must be an integer"),
    ({"mlp": "yes"}, "'mlp' must be true or false"),
    ({"moco_t": "hot"}, "'moco_t' must be a number"),
    ({"moco_k": 1000, "batch_size": 256}, "multiple of --batch-size"),
    ({"preset": "simclr"}, "--preset 'simclr'"),
    ({"amp": "fp8"}, "--amp"),
])
def test_bad_config_files_name_the_problem(tmp_path, content, match):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=match):
        resolve_config(config_file=f)


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        resolve_config(config_file=tmp_path / "nope.yaml")
    (tmp_path / "b.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_config(config_file=tmp_path / "b.json")


def test_config_is_plain_data():
    d = PretrainConfig().to_dict()
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in d.values())


def test_amp_auto_takes_bf16_only_where_the_cpu_computes_it(monkeypatch):
    from moco_transfer.pretrain.config import bf16_in_hardware, resolve_amp

    cpu = torch.device("cpu")
    flags = set()
    if Path("/proc/cpuinfo").is_file():  # the kernel's own list, independent of torch's probes
        flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
        assert bf16_in_hardware(cpu)[0] == bool(flags & {"amx_tile", "avx512_bf16"})
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert resolve_amp("auto", cpu) == ("none", "the CPU has neither AMX nor AVX512-BF16 (bfloat16 would be "
                                                "emulated, slower than fp32)")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert resolve_amp("auto", cpu) == ("bf16", "the CPU has AMX")
    assert resolve_amp("bf16", cpu) == ("bf16", "") and resolve_amp("none", cpu) == ("none", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_one_device_rule_for_pretraining_and_the_evaluators(tmp_path):
    from moco_transfer.distributed import pick_device
    from moco_transfer.pretrain.engine import run_pretraining

    assert pick_device(None) == pick_device("auto") == pick_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ValueError, match=f"--device {name}: no CUDA device is visible"):
            pick_device(name)
    cfg = resolve_config(overrides={"device": "cuda", "output": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="--device cuda: no CUDA device is visible"):
        run_pretraining(cfg)
    assert not (tmp_path / "run").exists()  # refused before the output folder is claimed
