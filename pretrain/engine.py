"""The pretraining loop: model and optimizer set-up, one epoch of MoCo steps, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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
from moco_transfer.distributed import agree
from moco_transfer.fileio import atomic_open, describe_key_mismatch, write_json_atomic
from moco_transfer.progress import progress, write
from moco_transfer.run_log import TENSORBOARD_DIR, WANDB_ID_FILE, MonitorOptions, RunLog
from moco_transfer.schedule import lr_at_epoch
from moco_transfer.signals import shut_down_workers

from .config import ConfigError, PretrainConfig, resolve_amp, save_resolved
from .curves import save_pretrain_curves
from .data import build_pretrain_dataset, build_pretrain_loader, seed_epoch, start_epoch_at
from .gpu_pipeline import DevicePipeline, pipeline_choice
from .monitor import KnnMonitor
from .online_probe import CHECKPOINT_KEY as PROBE_KEY
from .online_probe import OnlineProbe, dataset_classes
from .preemption import (
    MID_EPOCH_NAME,
    EpochPosition,
    StoppedBySignal,
    StopRequest,
    newest_checkpoint,
    rank_states,
    restore_random_states,
)

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


def select_device(cfg: PretrainConfig) -> torch.device:
    device = du.init_from_env()
    if cfg.device == "cpu":
        return torch.device("cpu")
    if cfg.device == "cuda" and device.type != "cuda":
        raise ConfigError("--device cuda: no CUDA device is visible")
    return device


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
    stopped_at: EpochPosition | None = None  # set when a stop signal ended the epoch early
    probe_top1: float | None = None  # the online probe's top-1 (%) on the epoch's labelled images


@dataclass
class EpochControl:
    """What train_one_epoch needs beyond the step: where to start, when to stop, when to save.

    `save(position)` writes the mid-epoch checkpoint; it runs every `save_every_s` seconds (0: never) at a
    figures read. Under torchrun the reads fall every `read_every` steps (agreed by all ranks), so a stop or a
    save is decided by all of them at the same step, with one small all-reduce per read.
    """

    stop: StopRequest | None = None
    save: Callable[[EpochPosition], None] | None = None
    save_every_s: float = 0.0
    start: EpochPosition | None = None
    read_every: int = 10
    probe: OnlineProbe | None = None
    on_read: Callable[[dict[str, float], int], None] | None = None  # (figures since the last read, global step)


def autocast_dtype(cfg: PretrainConfig, device: torch.device) -> torch.dtype | None:
    amp, _ = resolve_amp(cfg.amp, device)
    if amp == "none":
        return None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16, auto or none on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


SYNC_SECONDS = 1.0  # how often train_one_epoch reads the step figures from the device (one sync each time)


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, cfg: PretrainConfig, device: torch.device, epoch: int,
                    lr: float, control: EpochControl | None = None) -> EpochStats:
    """One epoch of MoCo steps without a host sync per step.

    Each step's loss and top-1 stay on the device in a per-epoch buffer; the host reads the new entries in one
    transfer about every SYNC_SECONDS (under torchrun: every `control.read_every` steps) and at the end of the
    epoch, checks them for NaN/inf there and names the first bad step. The epoch's checkpoint is written only
    after that last check, so the previous good one stays. A stop request ends the epoch after the step in
    progress (single process) or at the next read (all ranks at once); the caller then saves where it stood.
    """
    control = control or EpochControl()
    start = control.start or EpochPosition(epoch, 0, 0.0, 0.0)
    distributed = du.is_distributed()
    model.train()
    amp_dtype = autocast_dtype(cfg, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    total_steps = start.step + len(loader)
    # per step: loss, top-1 fraction, the online probe's correct and labelled counts
    figures = torch.zeros(max(len(loader), 1), 4, device=device)
    loss_sum, acc_sum = start.loss_sum, start.acc_sum
    probe_correct, probe_seen = start.probe_correct, start.probe_seen
    probe = control.probe
    steps = read = 0
    skipped: list[str] = []
    stopped = False
    begin = last_read = last_save = time.perf_counter()
    bar = progress(total=total_steps, initial=start.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not du.is_main_process(), dynamic_ncols=True, leave=False, mininterval=1.0,
                   log_every=cfg.log_every)

    def read_figures() -> None:
        nonlocal loss_sum, acc_sum, probe_correct, probe_seen, read
        window = figures[read:steps].tolist()
        for offset, (loss_value, acc, correct, labelled) in enumerate(window):
            if not math.isfinite(loss_value):
                bar.close()
                raise TrainingDiverged(
                    f"loss became {loss_value} at epoch {epoch + 1}, step {start.step + read + offset + 1} "
                    f"(lr {lr:.4g}); the run stopped and the last good checkpoint in {cfg.output} is intact. Lower "
                    f"--lr or --base-lr{', or use --amp bf16/none' if cfg.amp == 'fp16' else ''}.")
            loss_sum += loss_value
            acc_sum += acc * 100.0
            probe_correct += correct
            probe_seen += labelled
        read = steps
        images_per_s = steps * cfg.batch_size / (time.perf_counter() - begin)
        window_loss = sum(w[0] for w in window) / max(len(window), 1)
        bar.set_postfix(loss=f"{window_loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s:.1f}", refresh=False)
        if control.on_read is not None and window:
            shown = {"loss": window_loss, "acc1": 100.0 * sum(w[1] for w in window) / len(window), "lr": lr,
                     "images_per_s": images_per_s}
            labelled_now = sum(w[3] for w in window)
            if probe is not None and labelled_now:
                shown["online_probe_top1"] = 100.0 * sum(w[2] for w in window) / labelled_now
            control.on_read(shown, epoch * total_steps + start.step + steps)

    def position() -> EpochPosition:
        return EpochPosition(epoch, start.step + steps, loss_sum, acc_sum, probe_correct, probe_seen)

    batches = iter(loader)
    try:
        for views, targets, bad in batches:
            skipped.extend(bad)
            im_q = views[0].to(device, non_blocking=True, memory_format=memory_format)
            im_k = views[1].to(device, non_blocking=True, memory_format=memory_format)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits, labels = model(im_q, im_k)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            figures[steps, 0] = loss.detach()
            figures[steps, 1] = (logits.argmax(dim=1) == labels).float().mean()
            if probe is not None:
                figures[steps, 2:] = probe.step(targets)
            steps += 1
            bar.update()
            now = time.perf_counter()
            due = steps % control.read_every == 0 if distributed else now - last_read >= SYNC_SECONDS
            wants_stop = control.stop is not None and control.stop.requested
            if not (due or (wants_stop and not distributed)):
                continue
            read_figures()
            last_read = now
            save_due = control.save is not None and control.save_every_s > 0 and now - last_save >= control.save_every_s
            stop, save = agree([wants_stop, save_due], device)
            if stop and steps < len(loader):
                stopped = True
                break
            if save and steps < len(loader):
                control.save(position())
                last_save = time.perf_counter()
    finally:  # loader workers and a device pipeline's producer thread stop here, also on an error or Ctrl-C
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        shut_down_workers(batches)
    if read < steps:
        read_figures()
    bar.close()
    elapsed = time.perf_counter() - begin
    done = start.step + steps
    probe_top1 = None
    if probe is not None:
        correct, labelled = (du.all_reduce_mean(v, device) for v in (probe_correct, probe_seen))
        probe_top1 = 100.0 * correct / labelled if labelled else None
    return EpochStats(
        loss=du.all_reduce_mean(loss_sum / max(done, 1), device),
        acc1=du.all_reduce_mean(acc_sum / max(done, 1), device),
        images_per_s=steps * cfg.batch_size / elapsed,
        skipped=skipped,
        stopped_at=position() if stopped else None,
        probe_top1=probe_top1,
    )


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
    MonitorOptions(cfg.tensorboard, cfg.wandb).check()  # a missing package fails before any work
    device = select_device(cfg)
    amp, why = resolve_amp(cfg.amp, device)
    if amp != cfg.amp:  # the run records what it computes in: config.yaml and the checkpoint say bf16 or none
        log(f"--amp auto: {amp} ({why})")
        cfg = replace(cfg, amp=amp)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    claim_output(out, resume, force)
    dataset = build_pretrain_dataset(cfg, device)
    loader = build_pretrain_loader(cfg, dataset, device)
    model = build_model(cfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_encoders(model)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    probe = build_online_probe(cfg, dataset, model, device)
    start_epoch, history, position, rng_states, stored_knn = 0, [], None, None, None

    resume_path = resolve_resume(resume, cfg.output)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        changes = _check_resumable(cfg, ckpt.get("config", {}), resume_path, int(ckpt.get("epoch", 0)))
        if changes:
            log(f"resuming {resume_path} with changed settings: {', '.join(changes)}")
        for note in load_model_state(model, ckpt["state_dict"], str(resume_path)):
            log(f"{resume_path}: {note}")
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and cfg.amp == "fp16":
            scaler.load_state_dict(ckpt["scaler"])
        if probe is not None and not probe.load_checkpoint_state(ckpt.get(PROBE_KEY, {})):
            log(f"{resume_path}: no online probe for {probe.num_classes} classes in the file; a fresh one starts")
        start_epoch, history = int(ckpt.get("epoch", 0)), list(ckpt.get("history", []))
        stored_knn = ckpt.get("random_init_knn")
        position, rng_states = _mid_epoch_start(ckpt, resume_path)

    train_model: nn.Module = model
    if du.is_distributed():
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    monitor = KnnMonitor(cfg, device) if (cfg.knn_every or cfg.print_baseline) and du.is_main_process() else None
    random_init_knn = None
    if monitor is not None and cfg.print_baseline:
        random_init_knn = _random_init_knn(cfg, monitor, device, stored_knn)
    choice = pipeline_choice(cfg, device)  # the self-check's verdict, cached when the loader was built
    if du.is_main_process():
        save_resolved(cfg, out)
        _write_log(out, history)
        log(f"MoCo pretraining: {cfg.arch}, {len(dataset)} images, {len(loader)} steps/epoch, "
            f"batch {cfg.batch_size} on {du.world_size()} process(es), lr {cfg.effective_lr:.4g}, "
            f"K {cfg.moco_k}, m {cfg.moco_m}, T {cfg.moco_t}, {'MLP' if cfg.mlp else 'fc'} head"
            f"{' + BN' if cfg.head_bn else ''}, {'aug+' if cfg.aug_plus else 'v1 aug'} (crops >= {cfg.crop_min:g}"
            f"{'' if cfg.flip else ', no mirror'}), {'cosine' if cfg.cos else 'step'} lr, device {device}, "
            f"{choice.name} data pipeline")
        if choice.reason:
            log(choice.reason)

    def probe_state() -> dict[str, Any]:
        return {PROBE_KEY: probe.checkpoint_state()} if probe is not None else {}

    def save_mid_epoch(at: EpochPosition) -> Path:
        pipeline_rng = loader.consumed_rng if isinstance(loader, DevicePipeline) else None
        states = rank_states(at, pipeline_rng, device)  # every rank takes part
        path = out / MID_EPOCH_NAME
        if du.is_main_process():
            extra = {"mid_epoch": {"epoch": at.epoch, "step": at.step, "rng": states}, **probe_state()}
            atomic_save(checkpoint_dict(cfg, model, optimizer, scaler, at.epoch, history, random_init_knn, extra), path)
        du.barrier()
        return path

    steps_per_epoch = len(loader)
    first_step = (position.epoch * steps_per_epoch + position.step if position is not None
                  else start_epoch * steps_per_epoch) + (1 if start_epoch or position is not None else 0)
    run_log = RunLog(out, MonitorOptions(cfg.tensorboard, cfg.wandb), name=f"pretrain {out.name}",
                     config=cfg.to_dict(), first_step=first_step, main_process=du.is_main_process())
    stop = StopRequest().install()
    read_every = 10  # under torchrun; set from the measured step rate after each epoch
    ckpt_path = find_latest(out) if start_epoch else None
    epochs_bar = progress(range(start_epoch, cfg.epochs), initial=start_epoch, total=cfg.epochs, desc="pretrain",
                          disable=not du.is_main_process(), dynamic_ncols=True, mininterval=1.0,
                          log_every=cfg.log_every)
    try:
        for epoch in epochs_bar:
            lr = lr_at_epoch(cfg.effective_lr, epoch, cfg.epochs, cfg.cos, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed_epoch(loader, cfg.seed, epoch)
            control = EpochControl(stop=stop, save=save_mid_epoch, save_every_s=cfg.checkpoint_every_min * 60.0,
                                   read_every=read_every, probe=probe,
                                   on_read=partial(run_log.scalars, prefix="train/") if run_log.active else None)
            if position is not None and position.epoch == epoch:
                note = start_epoch_at(loader, position.step, rng_states.get("pipeline"))
                if note:
                    log(note)
                restore_random_states(rng_states, device)
                control.start, position = position, None
            stats = train_one_epoch(train_model, loader, optimizer, scaler, cfg, device, epoch, lr, control)
            if stats.stopped_at is not None:
                path = save_mid_epoch(stats.stopped_at)
                total = (control.start.step if control.start else 0) + len(loader)
                raise StoppedBySignal(f"stopped by {stop.signal_name} in epoch {epoch + 1} after batch "
                                      f"{stats.stopped_at.step} of {total}; wrote {path}. Continue with --resume auto.")
            rate = du.all_reduce_mean(stats.images_per_s / cfg.batch_size, device)  # steps/s, equal on every rank
            read_every = max(1, min(1000, round(SYNC_SECONDS * rate)))
            record = {"epoch": epoch + 1, "loss": round(stats.loss, 6), "lr": lr, "acc1": round(stats.acc1, 4),
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
            last = epoch + 1 == cfg.epochs
            if monitor is not None and cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or last):
                record["knn_top1"] = round(monitor(model.encoder_q), 3)
            epochs_bar.set_postfix(loss=f"{stats.loss:.4f}", acc1=f"{stats.acc1:.1f}", lr=f"{lr:.4g}",
                                   img_s=f"{stats.images_per_s:.1f}", refresh=False)
            log(json.dumps(record))
            history.append(record)
            run_log.scalars(record, (epoch + 1) * steps_per_epoch, prefix="epoch/")
            if du.is_main_process():
                ckpt_path = _save(cfg, model, optimizer, scaler, epoch, history, out, random_init_knn, probe_state())
                _write_log(out, history)
                _write_curves(cfg, out, history, random_init_knn)
            du.barrier()
            if not last and agree([stop.requested], device)[0]:
                raise StoppedBySignal(f"stopped by {stop.signal_name} after epoch {epoch + 1}; wrote {ckpt_path}. "
                                      "Continue with --resume auto.")
    finally:
        stop.close()
        run_log.close()
        if probe is not None:
            probe.remove()
    epochs_bar.close()

    summary: dict[str, Any] = {"epochs": cfg.epochs, "checkpoint": str(ckpt_path) if ckpt_path else None,
                               "last": history[-1] if history else None}
    if not du.is_main_process():
        return summary
    if monitor is not None:
        summary["knn_top1"] = history[-1].get("knn_top1") if history else None
        if summary["knn_top1"] is None:
            summary["knn_top1"] = round(monitor(model.encoder_q), 3)
        summary.update(knn_top1_random_init=random_init_knn, knn_k=cfg.knn_k, knn_t=cfg.knn_t,
                       knn_data=monitor.data_name)
    write_json_atomic(summary, out / SUMMARY_NAME)
    if random_init_knn is not None:
        log(f"weighted kNN top-1 (k={cfg.knn_k}, T={cfg.knn_t}) on the held-out split: "
            f"pretrained {summary['knn_top1']:.2f}%  vs  random weights {random_init_knn:.2f}%")
    log(f"learning curves: {out / CURVES_NAME}; summary: {out / SUMMARY_NAME}; checkpoint: {ckpt_path}")
    return summary


RUNNING_SUMS = ("loss_sum", "acc_sum", "probe_correct", "probe_seen")  # EpochPosition's, in its order


def _mid_epoch_start(ckpt: dict[str, Any], path: Path) -> tuple[EpochPosition | None, dict[str, Any] | None]:
    """Where a mid-epoch checkpoint stood, and this rank's random states; (None, None) for epoch checkpoints."""
    mid = ckpt.get("mid_epoch")
    if mid is None:
        log(f"resumed from {path} at epoch {int(ckpt.get('epoch', 0))}")
        return None, None
    states = mid["rng"]
    epoch, step = int(mid["epoch"]), int(mid["step"])
    log(f"resumed from {path} in epoch {epoch + 1}, after its batch {step}")
    if len(states) == du.world_size():
        mine = states[du.rank()]
        return EpochPosition(epoch, step, *(float(mine.get(k, 0.0)) for k in RUNNING_SUMS)), mine
    # Another world size. The seeded order makes the first `step` global batches the same images at any world
    # size (EpochSampler: rank r takes every world-th index of one permutation), so the place is kept: the
    # weights have seen those batches. Each rank's running sums become the old ranks' mean (the epoch's
    # figures are means over ranks); the random states are the epoch's seeded ones, since the old ranks' do
    # not map onto the new ones: the key shuffle of the remaining batches differs from an unstopped run.
    log(f"{path}: written by {len(states)} process(es), this run has {du.world_size()}: the epoch continues "
        f"after batch {step} with freshly seeded key shuffles")
    mean = [sum(float(s.get(k, 0.0)) for s in states) / len(states) for k in RUNNING_SUMS]
    return EpochPosition(epoch, step, *mean), {"pipeline": None}


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
