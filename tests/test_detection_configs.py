"""The shipped detectron2 configs hold the MoCo detection protocol's numbers (checked with and without detectron2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moco_transfer.detection_configs import (
    BASE,
    BASE_FPN,
    COCO_C4_1X,
    COCO_C4_2X,
    COCO_FPN_1X,
    COCO_FPN_2X,
    VOC_24K,
    available_configs,
    config_path,
    resolve_config,
)
from moco_transfer.eval.detection.benchmarks import COCO


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
    assert available_configs() == sorted([BASE, BASE_FPN, VOC_24K, COCO_C4_1X, COCO_C4_2X, COCO_FPN_1X, COCO_FPN_2X])
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


@pytest.mark.parametrize("name", [VOC_24K, COCO_C4_1X])
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
    cfg = load_resolved(config_path(COCO_C4_1X))
    assert cfg["MODEL"]["MASK_ON"] is True
    assert cfg["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 80
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == list(range(640, 801, 32))
    assert (cfg["DATASETS"]["TRAIN"], cfg["DATASETS"]["TEST"]) == (["coco_2017_train"], ["coco_2017_val"])
    assert (cfg["SOLVER"]["STEPS"], cfg["SOLVER"]["MAX_ITER"]) == ([60000, 80000], 90000)  # half of the paper's 2x


@pytest.mark.parametrize("name", [BASE, VOC_24K, COCO_C4_1X])
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


# --- the COCO set: `moco eval coco --config c4-1x|c4-2x|fpn-1x|fpn-2x` (the MoCo v1 paper, Sec. 4.2 and App. A) --

SCHEDULES = {"1x": ([60000, 80000], 90000), "2x": ([120000, 160000], 180000)}


@pytest.mark.parametrize("choice", ["c4-1x", "c4-2x", "fpn-1x", "fpn-2x"])
def test_coco_configs_hold_the_protocol(choice):
    """Mask R-CNN, every layer fine-tuned, BN trained and synchronised (and on the FPN's own layers), the standard
    heads (C4: res5 plus one norm), 640-800 / 800, batch 16 at lr 0.02, the 1x or 2x schedule, MoCo's input."""
    arch, schedule = choice.split("-")
    cfg = load_resolved(config_path(COCO.configs[choice]))
    m, s = cfg["MODEL"], cfg["SOLVER"]
    assert m["META_ARCHITECTURE"] == "GeneralizedRCNN" and m["MASK_ON"] is True
    assert m["ROI_HEADS"]["NUM_CLASSES"] == 80
    assert m["BACKBONE"]["FREEZE_AT"] == 0 and m["RESNETS"]["NORM"] == "naiveSyncBN"
    assert m["PIXEL_MEAN"] == [123.675, 116.280, 103.530] and m["PIXEL_STD"] == [58.395, 57.120, 57.375]
    assert cfg["INPUT"]["FORMAT"] == "RGB" and m["RESNETS"]["STRIDE_IN_1X1"] is False
    assert cfg["INPUT"]["MIN_SIZE_TRAIN"] == list(range(640, 801, 32)) and cfg["INPUT"]["MIN_SIZE_TEST"] == 800
    assert (s["IMS_PER_BATCH"], s["BASE_LR"]) == (16, 0.02)
    assert (s["STEPS"], s["MAX_ITER"]) == SCHEDULES[schedule]
    assert (cfg["DATASETS"]["TRAIN"], cfg["DATASETS"]["TEST"]) == (["coco_2017_train"], ["coco_2017_val"])
    if arch == "c4":
        assert m["ROI_HEADS"]["NAME"] == "Res5ROIHeadsExtraNorm" and m["RESNETS"]["OUT_FEATURES"] == ["res4"]
    else:
        assert m["BACKBONE"]["NAME"] == "build_resnet_fpn_backbone" and m["FPN"]["NORM"] == "naiveSyncBN"
        assert m["ROI_HEADS"]["NAME"] == "StandardROIHeads"
        assert "NORM" not in m["ROI_BOX_HEAD"] and "NORM" not in m["ROI_MASK_HEAD"]  # detectron2's standard heads
        assert (m["ROI_BOX_HEAD"]["NUM_FC"], m["ROI_MASK_HEAD"]["NUM_CONV"]) == (2, 4)


@pytest.mark.parametrize("choice", ["c4-1x", "fpn-2x"])
def test_coco_models_train_bn_where_the_protocol_says(choice):
    """detectron2 builds each model: naiveSyncBN, trainable, in the ResNet (and the FPN's layers, or after res5),
    none in the RPN, box or mask heads; no parameter frozen."""
    pytest.importorskip("detectron2", reason="detectron2 not installed (built from source; see docs/voc.md)")
    from detectron2.config import get_cfg
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.modeling import build_model

    from moco_transfer import detectron2_ext

    detectron2_ext.register()
    cfg = get_cfg()
    cfg.merge_from_file(str(config_path(COCO.configs[choice])))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    norms = [name for name, mod in model.named_modules() if isinstance(mod, NaiveSyncBatchNorm)]
    assert norms and all(p.requires_grad for p in model.parameters())
    assert not [n for n in norms if n.startswith(("proposal_generator.", "roi_heads.box_head", "roi_heads.mask_head",
                                                  "roi_heads.box_predictor"))]
    if choice.startswith("fpn"):
        fpn = [n for n in norms if n.startswith("backbone.fpn_")]
        assert len(fpn) == 8  # a norm after each of the 4 lateral and 4 output convolutions
        assert any(n.startswith("backbone.bottom_up.res5.") for n in norms)
    else:
        assert "roi_heads.res5.norm" in norms and any(n.startswith("backbone.res4.") for n in norms)


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
