"""The shipped detectron2 configs hold the MoCo detection protocol's numbers (checked with and without detectron2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco_transfer.detection_configs import BASE, COCO_1X, VOC_24K, available_configs, config_path, resolve_config


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_resolved(path: Path) -> dict:
    """Plain-YAML reading with `_BASE_` resolved relative to the file, the way detectron2 does it."""
    data = yaml.safe_load(path.read_text())
    base = data.pop("_BASE_", None)
    return _merge(load_resolved(path.parent / base), data) if base else data


def test_shipped_files_and_lookup(tmp_path):
    assert available_configs() == sorted([BASE, VOC_24K, COCO_1X])
    assert config_path("voc_R_50_C4_24k_moco") == config_path(VOC_24K)
    assert config_path(BASE).is_file()
    with pytest.raises(KeyError, match="choices"):
        config_path("nope")
    own = tmp_path / "mine.yaml"
    own.write_text("MODEL: {}\n")
    assert resolve_config(str(own)) == own.resolve()
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped config"):
        resolve_config(str(tmp_path / "missing.yaml"))


def test_base_protocol():
    cfg = load_resolved(config_path(BASE))
    m = cfg["MODEL"]
    assert m["META_ARCHITECTURE"] == "GeneralizedRCNN"
    assert m["BACKBONE"]["FREEZE_AT"] == 0
    assert m["RESNETS"]["NORM"] == "naiveSyncBN"
    assert m["RESNETS"]["OUT_FEATURES"] == ["res4"]  # C4
    assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"
    assert (m["RPN"]["PRE_NMS_TOPK_TEST"], m["RPN"]["POST_NMS_TOPK_TEST"]) == (6000, 1000)
    assert cfg["TEST"]["PRECISE_BN"]["ENABLED"] is True
    assert (cfg["SOLVER"]["IMS_PER_BATCH"], cfg["SOLVER"]["BASE_LR"]) == (16, 0.02)


@pytest.mark.parametrize("name", [VOC_24K, COCO_1X])
def test_moco_input_convention(name):
    cfg = load_resolved(config_path(name))
    assert cfg["MODEL"]["PIXEL_MEAN"] == [123.675, 116.280, 103.530]
    assert cfg["MODEL"]["PIXEL_STD"] == [58.395, 57.120, 57.375]
    assert cfg["INPUT"]["FORMAT"] == "RGB"
    assert cfg["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False
    assert cfg["MODEL"]["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm"


def test_voc_24k():
    cfg = load_resolved(config_path(VOC_24K))
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 20
    assert cfg["MODEL"]["MASK_ON"] is False
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == list(range(480, 801, 32))
    assert cfg["INPUT"]["MIN_SIZE_TEST"] == 800
    assert cfg["DATASETS"]["TRAIN"] == ["voc_2007_trainval", "voc_2012_trainval"]
    assert cfg["DATASETS"]["TEST"] == ["voc_2007_test"]
    s = cfg["SOLVER"]
    assert (s["STEPS"], s["MAX_ITER"], s["WARMUP_ITERS"]) == ([18000, 22000], 24000, 100)


def test_coco_1x():
    cfg = load_resolved(config_path(COCO_1X))
    assert cfg["MODEL"]["MASK_ON"] is True
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 80
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == list(range(640, 801, 32))
    assert (cfg["DATASETS"]["TRAIN"], cfg["DATASETS"]["TEST"]) == (["coco_2017_train"], ["coco_2017_val"])
    assert (cfg["SOLVER"]["STEPS"], cfg["SOLVER"]["MAX_ITER"]) == ([60000, 80000], 90000)  # half of the paper's 2x


@pytest.mark.parametrize("name", [BASE, VOC_24K, COCO_1X])
def test_detectron2_accepts_every_key(name):
    """detectron2's own loader rejects unknown keys; the merged values are the protocol's."""
    pytest.importorskip("detectron2", reason="detectron2 not installed (built from source; see docs/voc.md)")
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(str(config_path(name)))
    assert cfg.MODEL.RESNETS.NORM == "naiveSyncBN" and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.TEST.PRECISE_BN.ENABLED
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
    if name == VOC_24K:
        assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
        assert tuple(cfg.SOLVER.STEPS) == (18000, 22000) and cfg.SOLVER.MAX_ITER == 24000


def test_extra_norm_head_registered_and_built():
    """The registered head appends a norm after res5; registering twice is harmless."""
    pytest.importorskip("detectron2", reason="detectron2 not installed (built from source; see docs/voc.md)")
    from detectron2.config import get_cfg
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.modeling.backbone.resnet import BottleneckBlock
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

    from moco_transfer import detectron2_ext

    assert detectron2_ext.register() is detectron2_ext.register()
    assert "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY
    cfg = get_cfg()
    cfg.merge_from_file(str(config_path(VOC_24K)))
    res5, channels = ROI_HEADS_REGISTRY.get("Res5ROIHeadsExtraNorm")._build_res5_block(cfg)
    assert channels == 2048
    assert [type(m) for m in res5] == [BottleneckBlock] * 3 + [NaiveSyncBatchNorm]
    assert res5.norm.num_features == 2048
    assert res5[0].conv1.stride == (1, 1) and res5[0].conv2.stride == (2, 2)  # STRIDE_IN_1X1 False
