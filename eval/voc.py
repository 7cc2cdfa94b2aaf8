"""`moco eval voc`: fine-tune a MoCo backbone on PASCAL VOC07+12 with detectron2, N trials, and summarise.

Everything that can fail is checked before the first iteration: detectron2 importable, the config valid, the
VOC folders complete, the GPUs present, and the converted backbone loading into every backbone and res5 tensor
of the built model (no silent partial load). Trials run one after another, each through detectron2's
`launch` (one process per GPU, or in this process on CPU / one GPU), each in `trial_<k>/` with seed base+k.
A finished trial (metrics.json present) is skipped; an interrupted one resumes from its last checkpoint.
Bookkeeping lives in `voc_trials`, the VOC layout in `voc_layout`, the GPU rule in `gpu_scaling`.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moco_transfer.checkpoint import CheckpointError
from moco_transfer.convert import convert, read_detectron2_weights
from moco_transfer.detection_configs import VOC_24K, resolve_config
from moco_transfer.detectron2_ext import Detectron2Missing, register, require_detectron2
from moco_transfer.fileio import describe_key_mismatch, sha256_file

from .gpu_scaling import Change, scale_to_gpus
from .voc_layout import VOC_SPLITS, VocLayoutError, check_voc_root, our_name, voc_names
from .voc_trials import (
    RunMismatch,
    TrialState,
    check_run,
    read_metrics,
    summarize,
    trial_dir,
    trial_seed,
    trial_state,
    write_metrics,
)

CONVERTED_NAME = "backbone_d2.pkl"
IGNORED_WEIGHT_PREFIXES = ("stem.fc.",)  # the MoCo authors' converter leaves the projection head in as stem.fc.*


class VocSetupError(RuntimeError):
    """A problem found before training (config, GPUs, weights); the message says what to fix."""


# Everything `moco eval voc` reports as a plain error message before training starts.
SETUP_ERRORS = (Detectron2Missing, VocSetupError, VocLayoutError, RunMismatch)


@dataclass
class VocOptions:
    checkpoint: Path
    voc_root: Path
    output: Path
    trials: int = 5
    gpus: int | None = None  # None: every visible CUDA device, else CPU (0)
    config: str = VOC_24K
    opts: Sequence[str] = field(default_factory=list)
    seed: int = 0
    scale_to_gpus: bool = False
    max_ims_per_gpu: int = 4
    dist_url: str = "auto"


# --- configuration ------------------------------------------------------------------------------------------


def build_config(options: VocOptions, echo: Callable[[str], None] = print) -> Any:
    """detectron2 CfgNode: shipped/user YAML, then the GPU rule (if asked), then --opts; datasets at --voc-root."""
    require_detectron2()
    register()
    from detectron2.config import get_cfg

    try:
        path = resolve_config(options.config)
    except FileNotFoundError as exc:
        raise VocSetupError(f"--config: {exc}") from exc
    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(path))
    except Exception as exc:
        raise VocSetupError(f"--config {path}: not a valid detectron2 config ({type(exc).__name__}: {exc})") from exc
    if options.scale_to_gpus:
        changes = scale_to_gpus(cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.BASE_LR, tuple(cfg.SOLVER.STEPS),
                                cfg.SOLVER.MAX_ITER, options.gpus or 0, options.max_ims_per_gpu)
        _apply_changes(cfg, changes)
        devices = f"{options.gpus} GPU(s)" if options.gpus else "CPU"
        echo(f"--scale-to-gpus ({devices}): " + ("; ".join(map(str, changes)) if changes else "no change needed"))
    if len(options.opts) % 2:
        raise VocSetupError(f"--opts takes KEY VALUE pairs; got an odd count: {list(options.opts)}")
    try:
        cfg.merge_from_list(list(options.opts))
    except Exception as exc:
        raise VocSetupError(f"--opts {list(options.opts)}: {type(exc).__name__}: {exc}") from exc
    cfg.MODEL.DEVICE = "cuda" if (options.gpus or 0) > 0 else "cpu"
    cfg.DATASETS.TRAIN = tuple(our_name(n) for n in cfg.DATASETS.TRAIN)
    cfg.DATASETS.TEST = tuple(our_name(n) for n in cfg.DATASETS.TEST)
    if not cfg.DATASETS.TEST:
        raise VocSetupError("config has no DATASETS.TEST; a trial needs a test set to report AP")
    return cfg


def _apply_changes(cfg: Any, changes: Sequence[Change]) -> None:
    for ch in changes:
        node = cfg
        *parents, leaf = ch.key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, ch.new)


def _fingerprint_config(cfg: Any) -> str:
    """Hash of the training-relevant config: not the output folder, seed, weights path or device."""
    c = cfg.clone()
    c.defrost()
    c.OUTPUT_DIR, c.SEED, c.MODEL.WEIGHTS, c.MODEL.DEVICE = "", -1, "", ""
    return hashlib.sha256(c.dump().encode()).hexdigest()


# --- datasets -----------------------------------------------------------------------------------------------


def register_voc(voc_root: str | os.PathLike, names: Sequence[str]) -> list[str]:
    """Register `moco_<name>` for each builtin VOC name in `names`, rooted at `voc_root`; idempotent."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_pascal_voc

    done = []
    for name in voc_names(names):
        folder, split, year = VOC_SPLITS[name]
        ours, dirname = our_name(name), str((Path(voc_root) / folder).resolve())
        if ours in DatasetCatalog.list():
            if getattr(MetadataCatalog.get(ours), "dirname", None) == dirname:
                done.append(ours)
                continue
            DatasetCatalog.remove(ours)
            MetadataCatalog.remove(ours)
        register_pascal_voc(ours, dirname, split, year)
        MetadataCatalog.get(ours).evaluator_type = "pascal_voc"
        done.append(ours)
    return done


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
    """Model key -> name it must have in the weights file: every backbone tensor and res5 (minus the extra norm)."""
    out = {}
    for key in model_state:
        if key.startswith("backbone."):
            out[key] = key.removeprefix("backbone.")
        elif key.startswith("roi_heads.res5.") and not key.startswith("roi_heads.res5.norm."):
            out[key] = key.removeprefix("roi_heads.")
    return out


def check_weights(cfg: Any, weights_path: Path, weights: dict[str, Any]) -> dict[str, int]:
    """Build the model, compare names and shapes, then load with detectron2's checkpointer and verify values.

    Raises VocSetupError listing missing, unexpected and mis-shaped keys, or tensors whose values did not
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
        raise VocSetupError(f"weights {weights_path} do not match the config's backbone "
                            f"(RESNETS.DEPTH {cfg.MODEL.RESNETS.DEPTH}, ROI head {cfg.MODEL.ROI_HEADS.NAME}): "
                            + "; ".join(problems))
    DetectionCheckpointer(model).load(str(weights_path))
    loaded = model.state_dict()
    not_loaded = sorted(w for m, w in expected.items()
                        if not np.array_equal(loaded[m].cpu().numpy(), np.asarray(weights[w])))
    if not_loaded:
        raise VocSetupError(f"detectron2 did not load {len(not_loaded)} backbone tensors of {weights_path} "
                            f"(e.g. {', '.join(not_loaded[:6])})")
    del model
    return {"backbone_tensors": len(expected), "weight_tensors": len(weights)}


# --- one trial (runs in every worker process) ---------------------------------------------------------------


def _trainer_class() -> type:
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    class VocTrainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg: Any, dataset_name: str, output_folder: str | None = None) -> Any:
            return PascalVOCDetectionEvaluator(dataset_name)

    return VocTrainer


def run_trial(cfg_file: str, voc_root: str, seed: int) -> None:
    """Train and evaluate one trial from its saved config; rank 0 writes metrics.json. Entry point of `launch`."""
    from detectron2.config import get_cfg
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    register()
    cfg = get_cfg()
    cfg.merge_from_file(cfg_file)
    cfg.freeze()
    register_voc(voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    rank = comm.get_rank()
    logger = setup_logger(distributed_rank=rank, name="detectron2")
    setup_logger(distributed_rank=rank, name="fvcore")
    handler = None
    if rank == 0:
        handler = logging.FileHandler(Path(cfg.OUTPUT_DIR) / "log.txt")
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
    try:
        seed_all_rng(seed + rank)
        trainer = _trainer_class()(cfg)
        trainer.resume_or_load(resume=True)
        start_iter = trainer.start_iter
        trainer.train()
        if hasattr(trainer, "_last_eval_results"):  # set by DefaultTrainer's EvalHook after the last iteration
            results = trainer._last_eval_results
        else:
            results = trainer.test(cfg, trainer.model)
        if comm.is_main_process():
            write_metrics(cfg.OUTPUT_DIR, results["bbox"], seed, start_iter=start_iter, max_iter=cfg.SOLVER.MAX_ITER)
        comm.synchronize()
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        gc.collect()


# --- the command --------------------------------------------------------------------------------------------


def preflight(options: VocOptions, echo: Callable[[str], None] = print) -> tuple[Any, Path, dict[str, str]]:
    """All checks that need no training; returns the config, the weights file and the run fingerprint."""
    if options.gpus is None:
        options.gpus = torch.cuda.device_count()
    if options.trials < 1:
        raise VocSetupError(f"--trials must be at least 1, got {options.trials}")
    if options.gpus < 0:
        raise VocSetupError(f"--gpus must be >= 0 (0 = CPU), got {options.gpus}")
    if options.gpus > 0 and options.gpus > torch.cuda.device_count():
        raise VocSetupError(f"--gpus {options.gpus}: only {torch.cuda.device_count()} CUDA device(s) visible")
    cfg = build_config(options, echo)
    devices = max(1, options.gpus)
    if cfg.SOLVER.IMS_PER_BATCH % devices:
        raise VocSetupError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by {devices} GPUs")
    counts = check_voc_root(options.voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    echo("VOC datasets: " + ", ".join(f"{our_name(n)} ({c} images)" for n, c in counts.items()))
    if not options.checkpoint.is_file():
        raise VocSetupError(f"checkpoint {options.checkpoint}: file not found")
    options.output.mkdir(parents=True, exist_ok=True)
    fingerprint = {"checkpoint_sha256": sha256_file(options.checkpoint), "config_sha256": _fingerprint_config(cfg)}
    known = check_run(options.output, fingerprint, record=False)
    try:
        weights_path, weights = prepare_weights(options.checkpoint, options.output, reuse=known, echo=echo)
    except CheckpointError as exc:
        raise VocSetupError(str(exc)) from exc
    register_voc(options.voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    counts = check_weights(cfg, weights_path, weights)
    echo(f"weights {weights_path}: all {counts['backbone_tensors']} backbone/res5 tensors load into the model "
         f"(roi_heads.res5.norm, the head's extra norm layer, starts from its default init)")
    check_run(options.output, fingerprint)  # recorded only once everything above passed
    cfg.MODEL.WEIGHTS = str(weights_path.resolve())
    return cfg, weights_path, fingerprint


def _fmt_metrics(m: dict[str, Any]) -> str:
    return " ".join(f"{k} {'-' if m[k] is None else format(m[k], '.2f')}" for k in ("AP", "AP50", "AP75"))


def run_voc(options: VocOptions, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Pre-flight, then every unfinished trial in order; the summary is rewritten after each one."""
    cfg, weights_path, _ = preflight(options, echo)  # first: it reports a missing detectron2 with instructions
    from detectron2.engine import launch

    info = {"checkpoint": str(options.checkpoint), "weights": str(weights_path), "config": str(options.config),
            "opts": list(options.opts)}
    summary = summarize(options.output, options.trials, info)
    for k in range(options.trials):
        folder = trial_dir(options.output, k)
        state = trial_state(folder)
        seed = trial_seed(options.seed, k)
        if state is TrialState.FINISHED:
            m = read_metrics(folder)
            echo(f"trial {k + 1}/{options.trials} (seed {seed}): finished earlier ({_fmt_metrics(m)}), skipped")
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tcfg = cfg.clone()
        tcfg.defrost()
        tcfg.OUTPUT_DIR, tcfg.SEED = str(folder.resolve()), seed
        cfg_file = folder / "config.yaml"
        cfg_file.write_text(tcfg.dump())
        action = "resuming from its last checkpoint" if state is TrialState.INTERRUPTED else "starting"
        echo(f"trial {k + 1}/{options.trials} (seed {seed}): {action} in {folder}")
        launch(run_trial, max(1, options.gpus), dist_url=options.dist_url,
               args=(str(cfg_file), str(options.voc_root), seed))
        m = read_metrics(folder)
        if m is None:
            raise RuntimeError(f"trial {k} ended without {folder / 'metrics.json'}; see {folder / 'log.txt'}")
        summary = summarize(options.output, options.trials, info)
        echo(f"trial {k + 1}/{options.trials}: {_fmt_metrics(m)} -> {options.output / 'summary.md'}")
    return summary
