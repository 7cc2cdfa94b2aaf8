"""detectron2 pieces the MoCo detection protocol needs: the `Res5ROIHeadsExtraNorm` ROI head.

detectron2 is optional and imported lazily. `register()` adds the head to detectron2's ROI_HEADS registry (it
runs on `import moco_transfer.detectron2_ext` when detectron2 is importable) and is safe to call many times,
so stock detectron2 code paths never meet "No object named 'Res5ROIHeadsExtraNorm' found in 'ROI_HEADS'
registry" once this module is imported.
"""

from __future__ import annotations

import importlib.util
from typing import Any

ROI_HEAD_NAME = "Res5ROIHeadsExtraNorm"
INSTALL_HINT = (
    "detectron2 is not installed. It has no wheel for this Python: build it from source, e.g.\n"
    "  pip install fvcore iopath pycocotools omegaconf hydra-core cloudpickle\n"
    "  git clone https://github.com/facebookresearch/detectron2 && "
    "pip install --no-build-isolation -e detectron2\n"
    "(see docs/voc.md; a CPU-only build works with FORCE_CUDA=0)."
)

_registered: Any = None


class Detectron2Missing(RuntimeError):
    """detectron2 cannot be imported; the message says how to install it."""


def require_detectron2() -> None:
    """Raise Detectron2Missing with install instructions unless detectron2 (with its C ops) imports."""
    if importlib.util.find_spec("detectron2") is None:
        raise Detectron2Missing(INSTALL_HINT)
    try:
        import detectron2.config  # noqa: F401
        import detectron2.engine  # noqa: F401
    except Exception as exc:  # a broken build (missing C extension, missing fvcore, ...)
        raise Detectron2Missing(f"detectron2 is installed but fails to import ({type(exc).__name__}: {exc}).\n"
                                + INSTALL_HINT) from exc


def _make_head_class() -> type:
    from detectron2.layers import get_norm
    from detectron2.modeling.roi_heads import Res5ROIHeads

    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads whose res5 stage ends with one more norm layer of MODEL.RESNETS.NORM.

        This is the head of the MoCo authors' detection protocol: res5 followed by a norm layer (module
        `res5.norm`, freshly initialised) before the box predictor's pooling.
        """

        @classmethod
        def _build_res5_block(cls, cfg: Any) -> tuple[Any, int]:
            seq, out_channels = super()._build_res5_block(cfg)
            seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return seq, out_channels

    return Res5ROIHeadsExtraNorm


def register() -> type:
    """Register the head with detectron2's ROI_HEADS_REGISTRY once; return the registered class."""
    global _registered
    require_detectron2()
    from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY

    if ROI_HEAD_NAME in ROI_HEADS_REGISTRY:  # ours from an earlier call, or an equivalent one (MoCo's script)
        _registered = ROI_HEADS_REGISTRY.get(ROI_HEAD_NAME)
        return _registered
    cls = _make_head_class()
    ROI_HEADS_REGISTRY.register(cls)
    _registered = cls
    return cls


if importlib.util.find_spec("detectron2") is not None:
    try:
        register()
    except Detectron2Missing:  # a broken install: the CLI reports it with instructions when it is needed
        pass
