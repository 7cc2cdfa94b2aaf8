"""What a detection run is made of, worked out before any trial: its config, its fingerprint and its weights.

`build_config` reads the shipped or user YAML, applies the fewer-GPU rule and --amp, then --opts, and points the
datasets at the user's root. `run_fingerprint` is what run.json pins (the checkpoint, the training target, the
data and the base seed). `prepare_weights` converts a MoCo checkpoint to detectron2's format once per folder,
and `check_weights` proves that every pretrained tensor reaches the built model (no silent partial load),
whatever the model: R50-C4 (res5 in the box head) or R50-FPN (the ResNet under `backbone.bottom_up`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco_transfer.convert import convert, read_detectron2_weights
from moco_transfer.detection_configs import resolve_config
from moco_transfer.detectron2_ext import register, require_detectron2
from moco_transfer.fileio import describe_key_mismatch

from .errors import SetupError
from .gpu_scaling import Change, scale_to_gpus
from .trials import RUN_VERSION

CONVERTED_NAME = "backbone_d2.pkl"
IGNORED_WEIGHT_PREFIXES = ("stem.fc.",)  # the MoCo authors' converter leaves the projection head in as stem.fc.*
# Config keys that do not change what a trial optimises: changing them keeps the resume of interrupted trials.
EXECUTION_KEYS = ("OUTPUT_DIR", "SEED", "MODEL.WEIGHTS", "MODEL.DEVICE", "SOLVER.AMP.ENABLED",
                  "DATALOADER.NUM_WORKERS", "SOLVER.CHECKPOINT_PERIOD", "VIS_PERIOD", "CUDNN_BENCHMARK")
# Where the pretrained ResNet sits in a built model: the backbone itself (C4), under the FPN (FPN), or res5 in
# the C4 box head. Its extra norm layer (res5.norm) is new, as are the FPN's own layers and the heads.
PRETRAINED_PREFIXES = ("backbone.bottom_up.", "backbone.", "roi_heads.")
NEW_LAYERS = ("res5.norm.",)


def build_config(options: Any, echo: Callable[[str], None] = print) -> Any:
    """detectron2 CfgNode: shipped/user YAML, then the GPU rule (if asked), then --opts; datasets at the root.

    `options` is the runner's DetectionOptions (config, opts, amp, scale_to_gpus, GPUs per trial, benchmark).
    """
    require_detectron2()
    register()
    from detectron2.config import get_cfg

    try:
        path = resolve_config(options.benchmark.config_file(options.config))
    except FileNotFoundError as exc:
        choices = ", ".join(options.benchmark.configs)
        raise SetupError(f"--config: {exc}; the {options.benchmark.name} choices are {choices}") from exc
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(path))
    except Exception as exc:
        raise SetupError(f"--config {path}: not a valid detectron2 config ({type(exc).__name__}: {exc})") from exc
    per_trial = options.gpus_per_trial
    if options.scale_to_gpus:
        s = cfg.SOLVER
        changes = scale_to_gpus(s.IMS_PER_BATCH, s.BASE_LR, tuple(s.STEPS), s.MAX_ITER, per_trial,
                                options.max_ims_per_gpu, s.WARMUP_ITERS, cfg.TEST.EVAL_PERIOD, s.CHECKPOINT_PERIOD)
        _apply_changes(cfg, changes)
        devices = f"{per_trial} GPU(s) per trial" if per_trial else "CPU"
        echo(f"--scale-to-gpus ({devices}): " + ("; ".join(map(str, changes)) if changes else "no change needed"))
    if options.amp:
        cfg.SOLVER.AMP.ENABLED = True
    if len(options.opts) % 2:
        raise SetupError(f"--opts takes KEY VALUE pairs; got an odd count: {list(options.opts)}")
    try:
        cfg.merge_from_list(list(options.opts))
    except Exception as exc:
        raise SetupError(f"--opts {list(options.opts)}: {type(exc).__name__}: {exc}") from exc
    cfg.MODEL.DEVICE = "cuda" if per_trial > 0 else "cpu"
    if cfg.SOLVER.AMP.ENABLED and per_trial == 0:
        raise SetupError("--amp (SOLVER.AMP.ENABLED) needs CUDA GPUs: detectron2's AMP trainer runs fp16 autocast "
                         "on CUDA only; a CPU run trains in fp32 (drop --amp, or pass --gpus N)")
    cfg.DATASETS.TRAIN = tuple(options.benchmark.dataset_name(n) for n in cfg.DATASETS.TRAIN)
    cfg.DATASETS.TEST = tuple(options.benchmark.dataset_name(n) for n in cfg.DATASETS.TEST)
    if not cfg.DATASETS.TEST:
        raise SetupError("config has no DATASETS.TEST; a trial needs a test set to report AP")
    return cfg


def _apply_changes(cfg: Any, changes: Sequence[Change]) -> None:
    for ch in changes:
        node = cfg
        *parents, leaf = ch.key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, ch.new)


def target_config(cfg: Any) -> dict[str, Any]:
    """The config as flat KEY: value pairs, minus the EXECUTION_KEYS: what a trial optimises (JSON-normalised)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key in sorted(node):
            name = f"{prefix}{key}"
            if isinstance(node[key], dict):
                walk(node[key], name + ".")
            elif name not in EXECUTION_KEYS:
                flat[name] = node[key]

    walk(cfg, "")
    return json.loads(json.dumps(flat, default=str))


def _legacy_config_sha256(cfg: Any) -> str:
    """The hash run.json held before version 2: the whole config but output folder, seed, weights and device."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR, c.SEED, c.MODEL.WEIGHTS, c.MODEL.DEVICE = "", -1, "", ""
    return hashlib.sha256(c.dump().encode()).hexdigest()


def run_fingerprint(cfg: Any, checkpoint_sha256: str, data_root: str | os.PathLike | None = None,
                    seed: int | None = None, datasets: dict[str, Any] | None = None) -> dict[str, Any]:
    """What run.json pins: the checkpoint, the training target, the data and the base seed; precision, GPUs and
    workers are free.

    A trial's result depends on the images it trained and was tested on and on its seed as much as on the config:
    without them in the pin, trials finished on a subset count as finished for the full set, and a run with
    another --seed skips every trial. `datasets` (`Layout.datasets`) identifies the data by content; the root
    (resolved) is kept to name it, and compared only when the content cannot be (`trials.fingerprint_differences`).
    """
    target = target_config(cfg)
    out = {"version": RUN_VERSION, "checkpoint_sha256": checkpoint_sha256,
           "config_sha256": hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest(),
           "legacy_config_sha256": _legacy_config_sha256(cfg), "config": target}
    if data_root is not None:
        out["data_root"] = str(Path(data_root).resolve())
    if datasets is not None:
        out["datasets"] = datasets
    if seed is not None:
        out["seed"] = int(seed)
    return out


# --- weights ------------------------------------------------------------------------------------------------


def prepare_weights(checkpoint: Path, out_dir: Path, reuse: bool = False,
                    echo: Callable[[str], None] = print) -> tuple[Path, dict]:
    """A detectron2 .pkl for the run: the checkpoint itself if it is one, else its conversion in `out_dir`.

    A `.pkl` passed by the user is read as detectron2 weights (numpy-only unpickler); anything else is read as a
    MoCo checkpoint with weights_only=True and converted. `reuse` (the folder's run.json matched this checkpoint)
    keeps an earlier conversion.
    """
    if checkpoint.suffix == ".pkl":
        return checkpoint, read_detectron2_weights(checkpoint)["model"]
    target = out_dir / CONVERTED_NAME
    if not (reuse and target.is_file()):
        summary = convert(checkpoint, target, target="detectron2", force=True)
        echo(summary.format())
    return target, read_detectron2_weights(target)["model"]


def expected_weight_names(model_state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model key -> name it must have in the weights file: every tensor of the ResNet (stem, res2-res5), wherever
    the model holds it (see PRETRAINED_PREFIXES), minus the layers the protocol adds (NEW_LAYERS)."""
    out = {}
    for key in model_state:
        prefix = next((p for p in PRETRAINED_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            continue
        name = key.removeprefix(prefix)
        if name.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) and not name.startswith(NEW_LAYERS):
            out[key] = name
    return out


def check_weights(cfg: Any, weights_path: Path, weights: dict[str, Any]) -> dict[str, int]:
    """Build the model, compare names and shapes, then load with detectron2's checkpointer and verify values.

    Raises SetupError listing missing, unexpected and mis-shaped keys, or tensors whose values did not
    arrive through detectron2's matching. Returns counts for the log.
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    c = cfg.clone()
    c.defrost()
    c.MODEL.DEVICE = "cpu"
    model = build_model(c)
    state = model.state_dict()
    expected = expected_weight_names(state)
    names = {k for k in weights if not k.startswith(IGNORED_WEIGHT_PREFIXES)}
    problems = describe_key_mismatch({w: tuple(state[m].shape) for m, w in expected.items()},
                                     {w: tuple(np.shape(weights[w])) for w in names})
    if problems:
        raise SetupError(f"weights {weights_path} do not match the config's backbone "
                         f"(RESNETS.DEPTH {cfg.MODEL.RESNETS.DEPTH}, ROI head {cfg.MODEL.ROI_HEADS.NAME}): "
                            + "; ".join(problems))
    DetectionCheckpointer(model).load(str(weights_path))
    loaded = model.state_dict()
    not_loaded = sorted(w for m, w in expected.items()
                        if not np.array_equal(loaded[m].cpu().numpy(), np.asarray(weights[w])))
    if not_loaded:
        raise SetupError(f"detectron2 did not load {len(not_loaded)} backbone tensors of {weights_path} "
                         f"(e.g. {', '.join(not_loaded[:6])})")
    del model
    in_head = any(m.startswith("roi_heads.res5.") for m in expected)
    fresh = ["the RPN", "the heads"]
    if any(k.startswith("backbone.fpn_") for k in state):
        fresh.insert(0, "the FPN's layers")
    if any(k.startswith("roi_heads.res5.norm.") for k in state):
        fresh.append("roi_heads.res5.norm (the head's extra norm layer)")
    return {"backbone_tensors": len(expected), "weight_tensors": len(weights),
            "what": "backbone/res5" if in_head else "backbone",
            "new": f"the other {len(state) - len(expected)} tensors ({', '.join(fresh)})"}
