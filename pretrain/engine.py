"""The pretraining loop: model and optimizer set-up, one epoch of MoCo steps, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moco_transfer import distributed as du
from moco_transfer.backbone import HeadBatchNorm, build_resnet, feature_dim
from moco_transfer.builder import MoCo
from moco_transfer.checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_name,
    find_latest,
    load_checkpoint,
    with_module_prefix,
    without_module_prefix,
)
from moco_transfer.fileio import atomic_open, describe_key_mismatch, write_json_atomic
from moco_transfer.progress import progress, write
from moco_transfer.run_log import TENSORBOARD_DIR, WANDB_ID_FILE, MonitorOptions, RunLog
from moco_transfer.schedule import lr_at_epoch
from moco_transfer.signals import shut_down_workers
from moco_transfer.step_loop import SYNC_SECONDS, EpochPosition, StepLoop, mid_epoch_record, resume_position

from .config import ConfigError, PretrainConfig, resolve_amp, save_resolved
from .cpu_views import normalize_views
from .curves import save_pretrain_curves
from .data import build_pretrain_dataset, build_pretrain_loader, seed_epoch, start_epoch_at
from .gpu_pipeline import DevicePipeline, pipeline_choice
from .monitor import KnnMonitor
from .online_probe import CHECKPOINT_KEY as PROBE_KEY
from .online_probe import OnlineProbe, dataset_classes
from .preemption import MID_EPOCH_NAME, StopRequest, newest_checkpoint, restore_random_states

CURVES_NAME = "curves.png"
SUMMARY_NAME = "pretrain.json"

# Settings a resumed run may change: where and how fast it runs, what it logs and monitors, and how long it
# trains (a longer --epochs, as the official scripts allow). Every other field is the recipe, which must stay
# as the checkpoint was made, or the run's record (config.yaml, log.jsonl) would describe only its second part.
RESUMABLE_CHANGES = frozenset({
    "preset", "output", "data_root", "epochs", "workers", "device", "data_pipeline", "amp", "channels_last", "compile",
    "knn_every", "knn_data", "knn_k", "knn_t", "keep_every", "checkpoint_every_min", "print_baseline", "log_every",
    "online_probe", "tensorboard", "wandb",  # the probe reads the encoder and changes nothing it learns
})
# The files a run writes into its output folder; a fresh run refuses a folder that holds any of them.
RUN_FILE_PATTERNS = ("checkpoint_*.pth.tar", "log.jsonl", "pretrain.json", "config.yaml", "curves.png", WANDB_ID_FILE)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


def log(message: str) -> None:
    if du.is_main_process():
        write(message)


def build_model(cfg: PretrainConfig) -> MoCo:
    """Split BN only in a single process: with several processes the key shuffle crosses devices instead."""
    bn_splits = 1 if du.is_distributed() else cfg.bn_splits
    if bn_splits > 1 and (cfg.batch_size % bn_splits):
        raise ConfigError(f"--bn-splits {bn_splits} must divide --batch-size {cfg.batch_size}")
    encoder = partial(build_resnet, cfg.arch, small_images=cfg.small_images, bn_splits=bn_splits)
    head_norm = partial(HeadBatchNorm, num_splits=bn_splits) if cfg.head_bn else None
    return MoCo(encoder, dim=cfg.moco_dim, K=cfg.moco_k, m=cfg.moco_m, T=cfg.moco_t, mlp=cfg.mlp,
                symmetric=cfg.symmetric, head_norm=head_norm)


def load_model_state(model: MoCo, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load a MoCo state dict (DDP `module.` prefix or not); fills what official release files leave out.

    Returns notes about filled-in parts. Anything else missing or unexpected is an error.
    """
    sd = without_module_prefix(state_dict)
    notes = []
    if not any(k.startswith("encoder_q.") for k in sd):
        raise CheckpointError(f"{source}: no 'module.encoder_q.*' keys; not a MoCo pretraining checkpoint")
    if not any(k.startswith("encoder_k.") for k in sd):
        sd.update({"encoder_k." + k[len("encoder_q."):]: v for k, v in sd.items() if k.startswith("encoder_q.")})
        notes.append("no key encoder in the file: initialised from the query encoder")
    for name in ("queue", "queue_ptr"):
        if name not in sd:
            sd[name] = getattr(model, name).detach().clone()
            notes.append(f"no {name} in the file: a fresh one is used")
    problems = describe_key_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                     {k: tuple(v.shape) for k, v in sd.items()})
    if problems:
        raise CheckpointError(f"{source}: does not fit the configured model (--arch/--mlp/--moco-dim/--moco-k): "
                              + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return notes


def build_online_probe(cfg: PretrainConfig, dataset: Any, model: MoCo, device: torch.device) -> OnlineProbe | None:
    """The online probe when asked for, or by default when the pretraining set has labels."""
    classes = dataset_classes(dataset)
    if cfg.online_probe is False or (cfg.online_probe is None and len(classes) < 2):
        return None
    if len(classes) < 2:
        raise ConfigError(f"--online-probe: --data {cfg.data} has no class labels (a flat folder or a list without "
                          "labels); the probe needs them. Drop --online-probe.")
    return OnlineProbe(model.encoder_q.fc, feature_dim(cfg.arch), len(classes), device)


def compile_encoders(model: MoCo, **options: Any) -> None:
    """torch.compile both encoders in place (`nn.Module.compile`), so parameters, state-dict keys and the
    official checkpoint layout stay as they are; the queue, shuffle and momentum update run eagerly around them.
    `options` go to torch.compile (the tests pass backend="eager")."""
    model.encoder_q.compile(**options)
    model.encoder_k.compile(**options)


def build_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.SGD:
    """SGD over all parameters as officially (the key encoder's have no grad and are skipped), fused kernel.

    The fused kernel costs a sixth of the multi-tensor one on a CPU (ResNet-50: 11 vs 64 ms a step); torch
    builds without it fall back to foreach.
    """
    kwargs = dict(lr=cfg.effective_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.SGD(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.SGD(model.parameters(), foreach=True, **kwargs)


@dataclass
class EpochStats:
    loss: float
    acc1: float
    images_per_s: float
    skipped: list[str]
    probe_top1: float | None = None  # the online probe's top-1 (%) on the epoch's labelled images
    lr: float = 0.0


@dataclass
class EpochControl:
    """What train_one_epoch needs beyond the step: the run's step loop, where to start, the probe, who hears reads."""

    loop: StepLoop = field(default_factory=StepLoop)
    start: EpochPosition | None = None
    probe: OnlineProbe | None = None
    on_read: Callable[[dict[str, float], int], None] | None = None  # (figures since the last read, global step)


RUNNING_SUMS = ("loss_sum", "acc_sum", "probe_correct", "probe_seen")  # a step's loss, top-1 (%), probe counts


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    amp, _ = resolve_amp(cfg.amp, device)
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16, auto or none on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def model_input(views: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """A batch of views on `device`: the CPU pipeline's uint8 views (a quarter of the bytes to move) are
    normalised there; the device pipeline's arrive normalised."""
    views = views.to(device, non_blocking=True)
    if views.dtype == torch.uint8:
        views = normalize_views(views)
    return views.contiguous(memory_format=memory_format)


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, cfg: PretrainConfig, device: torch.device, epoch: int,
                    lr: float, control: EpochControl | None = None) -> EpochStats:
    """One epoch of MoCo steps without a host sync per step (the step loop reads their figures about once a second).
    Each read checks the new losses for NaN/inf and names the first bad step; the epoch's checkpoint is written
    only after the last check, so the previous good one stays."""
    control = control or EpochControl(StepLoop(seconds=SYNC_SECONDS))
    loop, probe = control.loop, control.probe
    start = control.start or EpochPosition(epoch)
    model.train()
    amp_dtype = autocast_dtype(cfg, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    total_steps = start.step + len(loader)
    skipped: list[str] = []
    bar = progress(total=total_steps, initial=start.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not du.is_main_process(), dynamic_ncols=True, leave=False, mininterval=1.0,
                   log_every=cfg.log_every)

    def images_per_s(at: EpochPosition) -> float:
        return (at.step - start.step) * cfg.batch_size / max(at.seconds - start.seconds, 1e-9)

    def check(rows: list[list[float]]) -> None:
        at = loop.position
        bad = next((i for i, row in enumerate(rows) if not math.isfinite(row[0])), None)
        if bad is not None:
            raise TrainingDiverged(
                f"loss became {rows[bad][0]} at epoch {epoch + 1}, step {at.step - len(rows) + bad + 1} "
                f"(lr {lr:.4g}); the run stopped and the last good checkpoint in {cfg.output} is intact. Lower "
                f"--lr or --base-lr{', or use --amp bf16/none' if cfg.amp == 'fp16' else ''}.")
        loss, acc1, correct, labelled = (sum(column) / len(rows) for column in zip(*rows, strict=True))
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s(at):.1f}", refresh=False)
        if control.on_read is not None:
            shown = {"loss": loss, "acc1": acc1, "lr": lr, "images_per_s": images_per_s(at)}
            if probe is not None and labelled:
                shown["online_probe_top1"] = 100.0 * correct / labelled
            control.on_read(shown, epoch * total_steps + at.step)

    batches = iter(loader)
    try:
        for views, targets, bad in loop.run(batches, start, len(loader), RUNNING_SUMS, device, check):
            skipped.extend(bad)
            im_q, im_k = (model_input(v, device, memory_format) for v in views)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits, labels = model(im_q, im_k)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            top1 = (logits.argmax(dim=1) == labels).float().mean() * 100.0
            loop.put(loss.detach(), top1, *(probe.step(targets) if probe is not None else (0.0, 0.0)))
            bar.update()
    finally:  # loader workers and a device pipeline's producer thread stop here, also on an error or Ctrl-C
        bar.close()
        getattr(batches, "close", lambda: None)()
        shut_down_workers(batches)
    at = loop.position
    probe_top1 = None
    if probe is not None:
        correct, labelled = (du.all_reduce_mean(v, device) for v in (at.probe_correct, at.probe_seen))
        probe_top1 = 100.0 * correct / labelled if labelled else None
    return EpochStats(loss=du.all_reduce_mean(at.loss_sum / max(at.step, 1), device),
                      acc1=du.all_reduce_mean(at.acc_sum / max(at.step, 1), device), images_per_s=images_per_s(at),
                      skipped=skipped, probe_top1=probe_top1, lr=lr)


def _same_setting(name: str, saved: Any, now: Any) -> bool:
    if name in ("data", "knn_data") and isinstance(saved, str) and isinstance(now, str):
        return os.path.realpath(saved) == os.path.realpath(now)  # ./data and /home/me/data are one folder
    return saved == now


def _check_resumable(cfg: PretrainConfig, saved: dict[str, Any], path: Path, completed: int) -> list[str]:
    """Refuse a resume that would change the recipe (naming each setting); return the allowed changes made."""
    now = cfg.to_dict()
    changed = [k for k in now if k in saved and not _same_setting(k, saved[k], now[k])]
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        listed = "; ".join(f"--{k.replace('_', '-')}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in refused)
        raise ConfigError(f"--resume {path}: the run was made with other settings ({listed}). Resume with the "
                          "run's own settings (its config.yaml, via --config), or start a new run in another --output")
    if cfg.epochs < completed:
        raise ConfigError(f"--epochs {cfg.epochs}: {path} has already trained {completed} epochs")
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed if k not in ("preset", "output")]


def _existing_run_files(out: Path) -> list[Path]:
    return sorted({p for pattern in RUN_FILE_PATTERNS for p in out.glob(pattern) if p.is_file()})


def claim_output(out: Path, resume: str | None, force: bool) -> None:
    """A fresh run never writes over another run: a folder holding one is refused, or set aside with `force`.

    Without this, start-up rewrote config.yaml and log.jsonl and the first epoch deleted the old run's newest
    checkpoint. With `force` the old run's files move to `<output>/replaced-<UTC time>/`, kept whole. Every rank
    checks before rank 0 moves anything (collective: all ranks call it).
    """
    found = _existing_run_files(out) if resume is None else []
    if found and not force:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"--output {out}: holds a run ({names}). Continue it with --resume auto, write the new "
                          f"run to another folder with --output DIR, or start over with --force (the old run's "
                          f"files then move to {out}/replaced-<time>/)")
    du.barrier()
    if found and du.is_main_process():
        aside = out / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
        aside.mkdir(parents=True, exist_ok=True)
        for path in [*found, *[d for d in [out / TENSORBOARD_DIR] if d.is_dir()]]:
            path.rename(aside / path.name)
        log(f"--force: moved the run that was in {out} ({len(found)} files) to {aside}")
    du.barrier()


def resolve_resume(resume: str | None, output: str) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        latest = newest_checkpoint(output)
        if latest is None:
            log(f"--resume auto: no checkpoint in {output}; starting from scratch")
        return latest
    return Path(resume)


def run_pretraining(cfg: PretrainConfig, resume: str | None = None, force: bool = False) -> dict[str, Any]:
    """Train MoCo as configured; returns a summary (last epoch's figures, kNN accuracies, checkpoint path).

    SIGTERM or SIGUSR1 stops the run after the step in progress (StoppedBySignal, after the mid-epoch
    checkpoint is written); `resume="auto"` continues from the newest checkpoint, mid-epoch ones included.
    Without `resume`, an output folder that holds a run is refused unless `force` (see claim_output).
    """
    run = PretrainRun(cfg, resume, force)
    run.resume(resolve_resume(resume, cfg.output))
    run.begin()
    epochs = progress(range(run.start_epoch, cfg.epochs), initial=run.start_epoch, total=cfg.epochs, desc="pretrain",
                      disable=not du.is_main_process(), dynamic_ncols=True, mininterval=1.0, log_every=cfg.log_every)
    try:
        for epoch in epochs:
            stats = run.train_epoch(epoch)
            run.record(epoch, stats, epochs)
            run.save_epoch(epoch)
            run.loop.stop_after(epoch, cfg.epochs, run.ckpt_path)
    finally:
        run.close()
    epochs.close()
    return run.finish()


class PretrainRun:
    """One run of run_pretraining, each part a method: set-up (here), resume, begin; then for each epoch train,
    record, save (the loop's `stop_after` is the maybe-stop); then finish."""

    def __init__(self, cfg: PretrainConfig, resume: str | None, force: bool) -> None:
        """Device and precision, the output folder claimed, data, model, optimizer, online probe, kNN monitor."""
        MonitorOptions(cfg.tensorboard, cfg.wandb).check()  # a missing package fails before any work
        try:
            self.device = device = du.pick_device(cfg.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        amp, why = resolve_amp(cfg.amp, device)
        if amp != cfg.amp:  # the run records what it computes in: config.yaml and the checkpoint say bf16 or none
            log(f"--amp auto: {amp} ({why})")
            cfg = replace(cfg, amp=amp)
        torch.manual_seed(cfg.seed)
        self.cfg, self.out = cfg, Path(cfg.output)
        claim_output(self.out, resume, force)
        dataset = build_pretrain_dataset(cfg, device)
        self.loader = build_pretrain_loader(cfg, dataset, device)
        self.model = model = build_model(cfg).to(device)
        if cfg.channels_last:
            self.model = model = model.to(memory_format=torch.channels_last)
        if cfg.compile:
            compile_encoders(model)
        self.optimizer = build_optimizer(model, cfg)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        self.probe = build_online_probe(cfg, dataset, model, device)
        self.train_model: nn.Module = model  # DDP's under torchrun; a resume loads into `model`, which it shares
        if du.is_distributed():
            self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        monitored = (cfg.knn_every or cfg.print_baseline) and du.is_main_process()
        self.monitor = KnnMonitor(cfg, device) if monitored else None
        self.start_epoch, self.history, self.loop = 0, [], StepLoop()
        self.position: EpochPosition | None = None  # where a mid-epoch checkpoint stood, until its epoch starts
        self.rng_states: dict[str, Any] = {}  # and this rank's random states there
        self.stored_knn = self.random_init_knn = self.ckpt_path = self.run_log = None

    def resume(self, path: Path | None) -> None:
        """Continue from `path`: weights, optimizer, scaler, probe, history, and where a mid-epoch checkpoint stood."""
        if path is None:
            return
        ckpt = load_checkpoint(path)
        changes = _check_resumable(self.cfg, ckpt.get("config", {}), path, int(ckpt.get("epoch", 0)))
        if changes:
            log(f"resuming {path} with changed settings: {', '.join(changes)}")
        for note in load_model_state(self.model, ckpt["state_dict"], str(path)):
            log(f"{path}: {note}")
        if "optimizer" in ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and self.cfg.amp == "fp16":
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.probe is not None and not self.probe.load_checkpoint_state(ckpt.get(PROBE_KEY, {})):
            log(f"{path}: no online probe for {self.probe.num_classes} classes in the file; a fresh one starts")
        self.start_epoch, self.history = int(ckpt.get("epoch", 0)), list(ckpt.get("history", []))
        self.stored_knn = ckpt.get("random_init_knn")
        self.position, self.rng_states = _mid_epoch_start(ckpt, path)
        self.ckpt_path = find_latest(self.out) if self.start_epoch else None

    def begin(self) -> None:
        """Before the first step: the random-weights kNN, config.yaml and the header, the monitors' logs, and the
        stop signals turned into the step loop's flag."""
        cfg, at, steps = self.cfg, self.position, len(self.loader)
        if self.monitor is not None and cfg.print_baseline:
            self.random_init_knn = _random_init_knn(cfg, self.monitor, self.device, self.stored_knn)
        choice = pipeline_choice(cfg, self.device)  # the self-check's verdict, cached when the loader was built
        if du.is_main_process():
            save_resolved(cfg, self.out)
            _write_log(self.out, self.history)
            log(f"MoCo pretraining: {cfg.arch}, {len(self.loader.dataset)} images, {steps} steps/epoch, "
                f"batch {cfg.batch_size} on {du.world_size()} process(es), lr {cfg.effective_lr:.4g}, "
                f"K {cfg.moco_k}, m {cfg.moco_m}, T {cfg.moco_t}, {'MLP' if cfg.mlp else 'fc'} head"
                f"{' + BN' if cfg.head_bn else ''}, {'aug+' if cfg.aug_plus else 'v1 aug'} (crops >= "
                f"{cfg.crop_min:g}{'' if cfg.flip else ', no mirror'}), {'cosine' if cfg.cos else 'step'} lr, "
                f"device {self.device}, {choice.name} data pipeline")
            if choice.reason:
                log(choice.reason)
        first_step = (at.epoch * steps + at.step if at is not None else self.start_epoch * steps) + (
            1 if self.start_epoch or at is not None else 0)
        self.run_log = RunLog(self.out, MonitorOptions(cfg.tensorboard, cfg.wandb), name=f"pretrain {self.out.name}",
                              config=cfg.to_dict(), first_step=first_step, main_process=du.is_main_process())
        self.loop = StepLoop("pretrain", StopRequest().install(), self.save_mid_epoch, cfg.checkpoint_every_min * 60)

    def train_epoch(self, epoch: int) -> EpochStats:
        """Epoch `epoch` at its lr and seeded order, from where a mid-epoch checkpoint stood if in this epoch (a
        stop request ends it with the mid-epoch checkpoint written and StoppedBySignal)."""
        cfg, loader = self.cfg, self.loader
        lr = lr_at_epoch(cfg.effective_lr, epoch, cfg.epochs, cfg.cos, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seed_epoch(loader, cfg.seed, epoch)
        control = EpochControl(self.loop, probe=self.probe,
                               on_read=partial(self.run_log.scalars, prefix="train/") if self.run_log.active else None)
        if self.position is not None and self.position.epoch == epoch:
            note = start_epoch_at(loader, self.position.step, self.rng_states.get("pipeline"))
            if note:
                log(note)
            restore_random_states(self.rng_states, self.device)
            control.start, self.position = self.position, None
        return train_one_epoch(self.train_model, loader, self.optimizer, self.scaler, cfg, self.device, epoch, lr,
                               control)

    def save_mid_epoch(self, at: EpochPosition) -> Path:
        """The mid-epoch checkpoint; every rank takes part (their sums and random states are gathered)."""
        pipeline_rng = self.loader.consumed_rng if isinstance(self.loader, DevicePipeline) else None
        record = mid_epoch_record(at, self.device, pipeline_rng.cpu() if pipeline_rng is not None else None)
        path = self.out / MID_EPOCH_NAME
        if du.is_main_process():
            atomic_save(checkpoint_dict(self.cfg, self.model, self.optimizer, self.scaler, at.epoch, self.history,
                                        self.random_init_knn, {"mid_epoch": record, **self.probe_state()}), path)
        du.barrier()
        return path

    def record(self, epoch: int, stats: EpochStats, bar: Any) -> None:
        """The epoch's figures, with the kNN monitor's top-1 when due: a line in log.jsonl (and on the console),
        TensorBoard/W&B's epoch/ figures and the epochs bar."""
        cfg, loader = self.cfg, self.loader
        record = {"epoch": epoch + 1, "loss": round(stats.loss, 6), "lr": stats.lr, "acc1": round(stats.acc1, 4),
                  "images_per_s": round(stats.images_per_s, 2), "skipped_files": len(stats.skipped)}
        if stats.probe_top1 is not None:
            record["online_probe_top1"] = round(stats.probe_top1, 3)
        if isinstance(loader, DevicePipeline):
            record.update(loader.epoch_record())
            warning = loader.fallback_warning()
            if warning:
                log(warning)
        if stats.skipped:
            record["skipped_examples"] = stats.skipped[:20]
            log(f"epoch {epoch + 1}: skipped {len(stats.skipped)} unreadable image file(s), e.g. "
                + "; ".join(stats.skipped[:3]))
        if self.monitor is not None and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or epoch + 1 == cfg.epochs):
            record["knn_top1"] = round(self.monitor(self.model.encoder_q), 3)
        bar.set_postfix(loss=f"{stats.loss:.4f}", acc1=f"{stats.acc1:.1f}", lr=f"{stats.lr:.4g}",
                        img_s=f"{stats.images_per_s:.1f}", refresh=False)
        log(json.dumps(record))
        self.history.append(record)
        self.run_log.scalars(record, (epoch + 1) * len(loader), prefix="epoch/")

    def save_epoch(self, epoch: int) -> None:
        """The epoch's checkpoint, log.jsonl and curves (rank 0); then the ranks go on together."""
        if du.is_main_process():
            self.ckpt_path = _save(self.cfg, self.model, self.optimizer, self.scaler, epoch, self.history, self.out,
                                   self.random_init_knn, self.probe_state())
            _write_log(self.out, self.history)
            _write_curves(self.cfg, self.out, self.history, self.random_init_knn)
        du.barrier()

    def finish(self) -> dict[str, Any]:
        """The summary (every rank returns it; rank 0 writes pretrain.json and prints the kNN verdict)."""
        cfg, history, monitor = self.cfg, self.history, self.monitor
        summary: dict[str, Any] = {"epochs": cfg.epochs, "checkpoint": str(self.ckpt_path) if self.ckpt_path else None,
                                   "last": history[-1] if history else None}
        if not du.is_main_process():
            return summary
        if monitor is not None:
            summary["knn_top1"] = history[-1].get("knn_top1") if history else None
            if summary["knn_top1"] is None:
                summary["knn_top1"] = round(monitor(self.model.encoder_q), 3)
            summary.update(knn_top1_random_init=self.random_init_knn, knn_k=cfg.knn_k, knn_t=cfg.knn_t,
                           knn_data=monitor.data_name)
        write_json_atomic(summary, self.out / SUMMARY_NAME)
        if self.random_init_knn is not None:
            log(f"weighted kNN top-1 (k={cfg.knn_k}, T={cfg.knn_t}) on the held-out split: "
                f"pretrained {summary['knn_top1']:.2f}%  vs  random weights {self.random_init_knn:.2f}%")
        log(f"learning curves: {self.out / CURVES_NAME}; summary: {self.out / SUMMARY_NAME}; checkpoint: "
            f"{self.ckpt_path}")
        return summary

    def probe_state(self) -> dict[str, Any]:
        return {PROBE_KEY: self.probe.checkpoint_state()} if self.probe is not None else {}

    def close(self) -> None:
        """After `begin`, however the run ends: the signal handlers back, the logs closed, the probe's hook removed."""
        self.loop.stop.close()
        self.run_log.close()
        if self.probe is not None:
            self.probe.remove()


def _mid_epoch_start(ckpt: dict[str, Any], path: Path) -> tuple[EpochPosition | None, dict[str, Any]]:
    """Where a mid-epoch checkpoint stood, and this rank's random states; (None, {}) for epoch checkpoints."""
    mid = ckpt.get("mid_epoch")
    if mid is None:
        log(f"resumed from {path} at epoch {int(ckpt.get('epoch', 0))}")
        return None, {}
    position, states = resume_position(mid, RUNNING_SUMS)
    log(f"resumed from {path} in epoch {position.epoch + 1}, after its batch {position.step}")
    if len(mid["rng"]) != du.world_size():
        # The first `step` global batches are the same images at any world size (EpochSampler), so the place is kept;
        # the old ranks' random states do not map onto the new ones: the rest of the epoch shuffles keys afresh.
        log(f"{path}: written by {len(mid['rng'])} process(es), this run has {du.world_size()}: the epoch "
            f"continues after batch {position.step} with freshly seeded key shuffles")
    return position, states


def _random_init_knn(cfg: PretrainConfig, monitor: KnnMonitor, device: torch.device,
                     stored: dict[str, Any] | None = None) -> float:
    """kNN top-1 of the same architecture with random weights (seeded), measured once per run.

    Deterministic, so a resumed run takes it from its checkpoint when nothing it depends on changed. The
    global RNG is left as it was, so the training run draws what it would have drawn without it.
    """
    key = _random_init_key(cfg)
    if stored is not None and stored.get("key") == key:
        return float(stored["value"])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        random_encoder = build_resnet(cfg.arch, small_images=cfg.small_images).to(device)
        return round(monitor(random_encoder), 3)


def _random_init_key(cfg: PretrainConfig) -> list[Any]:
    return [cfg.arch, cfg.small_images, cfg.image_size, cfg.seed, cfg.knn_k, cfg.knn_t, cfg.knn_data or cfg.data]


def _write_curves(cfg: PretrainConfig, out: Path, history: list[dict[str, Any]],
                  random_init_knn: float | None) -> None:
    title = (f"MoCo {cfg.arch}, {cfg.data or 'embedded'}, {cfg.image_size}px, batch {cfg.batch_size}, "
             f"K {cfg.moco_k}, m {cfg.moco_m}, T {cfg.moco_t}")
    save_pretrain_curves(history, out / CURVES_NAME, title, chance_loss=math.log(cfg.moco_k + 1),
                         random_init_knn=random_init_knn)


def checkpoint_dict(cfg: PretrainConfig, model: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                completed: int, history: list[dict[str, Any]], random_init_knn: float | None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The official layout (`epoch` = completed epochs, `arch`, `state_dict`, `optimizer`) plus this project's."""
    ckpt = {
        "epoch": completed,
        "arch": cfg.arch,
        "state_dict": with_module_prefix(model.state_dict()),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "config": cfg.to_dict(),
        "history": history,
    }
    if random_init_knn is not None:
        ckpt["random_init_knn"] = {"value": random_init_knn, "key": _random_init_key(cfg)}
    return {**ckpt, **(extra or {})}


def _save(cfg: PretrainConfig, model: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
          epoch: int, history: list[dict[str, Any]], out: Path, random_init_knn: float | None = None,
          extra: dict[str, Any] | None = None) -> Path:
    """Write this epoch's checkpoint atomically, then drop the previous one unless it is to be kept, and the
    mid-epoch one, which is older now."""
    path = out / checkpoint_name(epoch)
    previous = find_latest(out)
    atomic_save(checkpoint_dict(cfg, model, optimizer, scaler, epoch + 1, history, random_init_knn, extra), path)
    (out / MID_EPOCH_NAME).unlink(missing_ok=True)
    if previous is not None and previous != path:
        prev_epoch = int(previous.name.split("_")[1].split(".")[0])
        if not (cfg.keep_every and (prev_epoch + 1) % cfg.keep_every == 0):
            previous.unlink(missing_ok=True)
    return path


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    """The JSON-lines log is rewritten from the checkpoint's history, so a resumed run never repeats a line."""
    with atomic_open(out / "log.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in history))
