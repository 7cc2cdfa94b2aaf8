"""Linear classification on a frozen MoCo backbone: the official protocol, a cached fast path, and L-BFGS.

faithful: frozen backbone kept in eval mode, fresh fc ~ N(0, 0.01) with bias 0, SGD momentum 0.9, wd 0,
lr 30 per 256 images, lr x0.1 at 60% and 80% of the epochs (60 and 80 of 100), RandomResizedCrop + flip for
training, resize/center-crop for validation, a check that no backbone tensor changed.
cached: the same optimiser and schedule on features of the center crops, extracted once and cached.
lbfgs: scikit-learn's L2-regularised logistic regression, C chosen on a held-out part of train.

SIGTERM or SIGUSR1 during SGD training stops it after the step in progress (moco_transfer.step_loop): the state
(fc, optimizer, history, where the epoch stood) goes to linear_checkpoint.pth.tar, the run exits with EXIT_STOPPED
(75), and `--resume` runs the rest of that epoch with the batches and views (moco_transfer.seeded_order) of the
straight run. The loader workers outlive a signal sent to the whole process group (Slurm, torchrun's agent,
`timeout`), so that the main process can save, and end when training does.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moco_transfer import distributed as du
from moco_transfer.augment import eval_transform, linear_train_transform
from moco_transfer.checkpoint import CheckpointError, atomic_save
from moco_transfer.data import collate_with_skips, make_datasets
from moco_transfer.feature_cache import FeatureCache
from moco_transfer.fileio import write_json_atomic
from moco_transfer.knn import topk_correct
from moco_transfer.pretrained import PresetLinear, PretrainedBackbone, load_pretrained_backbone
from moco_transfer.progress import progress
from moco_transfer.run_log import MonitorOptions, RunLog
from moco_transfer.schedule import lr_at_epoch
from moco_transfer.seeded_order import EpochSampler, SeededItems, epoch_seed
from moco_transfer.signals import StopRequest, loader_worker_init, shut_down_workers
from moco_transfer.step_loop import EpochPosition, StepLoop, mid_epoch_record, restore_random_states, resume_position

from .common import backbone_features
from .plots import save_curve

MODES = ("faithful", "cached", "lbfgs")
BASE_LR = 30.0
PROTOCOL_EPOCHS = 100
IMAGENET_PROTOCOL = "the ImageNet protocol"
STATE_NAME = "linear_checkpoint.pth.tar"
SUMS = ("loss_sums", "seen")  # a step's loss x its images, and its images: running sums per rank

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LinearConfig:
    """Hyperparameters; None means the checkpoint's preset's setting (see `resolve_settings`), else the protocol's.

    `lr=None`: the preset's lr per 256 images, or 30, scaled with the batch; `epochs=None`: the preset's or 100;
    `milestones=None`: 60% and 80% of the epochs.
    """

    mode: str = "faithful"
    epochs: int | None = None
    batch_size: int = 256
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: tuple[int, ...] | None = None
    workers: int = 2
    seed: int = 0
    lbfgs_holdout: float = 0.2
    lbfgs_grid: tuple[float, ...] = field(default_factory=lambda: tuple(float(c) for c in np.logspace(-4, 4, 9)))
    lbfgs_max_iter: int = 1000


def base_lr(batch_size: int, lr: float | None = None, per_256: float = BASE_LR) -> float:
    """The protocol's lr 30 (or a preset's `per_256`) for batch 256, scaled linearly with the batch unless given."""
    return float(lr) if lr is not None else per_256 * batch_size / 256


def resolve_settings(cfg: LinearConfig, preset: PresetLinear | None = None) -> tuple[LinearConfig, str]:
    """Fill the settings left unset from the checkpoint's preset, else from the ImageNet protocol.

    The protocol's lr 30 blows the loss up on features of another scale (the embedded default's), so a preset
    measured for its own checkpoints brings its lr and epochs; each option given explicitly still wins. Returns
    the concrete config (lr absolute) and where its defaults came from, for linear.json and the console.
    """
    if cfg.mode == "lbfgs":
        return cfg, "logistic regression, C chosen on held-out train (no lr or epochs)"
    per_256 = preset.lr if preset is not None else BASE_LR
    epochs = cfg.epochs if cfg.epochs is not None else (preset.epochs if preset is not None else PROTOCOL_EPOCHS)
    resolved = replace(cfg, epochs=epochs, lr=base_lr(cfg.batch_size, cfg.lr, per_256))
    origin = preset.describe() if preset is not None else IMAGENET_PROTOCOL
    given = [name for name, value in (("lr", cfg.lr), ("epochs", cfg.epochs)) if value is not None]
    if len(given) == 2:
        return resolved, "lr and epochs as given"
    return resolved, origin + (f", {given[0]} as given" if given else "")


def default_milestones(epochs: int) -> tuple[int, ...]:
    """60 and 80 at 100 epochs; the same fractions of shorter or longer runs."""
    return tuple(sorted({max(1, round(epochs * f)) for f in (0.6, 0.8)}))


def fresh_fc(in_features: int, num_classes: int) -> nn.Linear:
    """The protocol's classifier: weights N(0, 0.01), bias 0."""
    fc = nn.Linear(in_features, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """The official sanity check, extended to BN buffers: a frozen backbone must be bit-identical."""
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, reference[k].to(v.device))]
    if changed:
        raise RuntimeError(f"backbone changed during linear training ({len(changed)} tensors, e.g. {changed[:5]}): "
                           "the backbone must stay frozen and in eval mode")


@torch.no_grad()
def evaluate(fc: nn.Module, batches: Batches, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 percent over all ranks' shards of the validation set."""
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for feats, labels in batches:
        labels = labels.to(device)
        c1, c5 = topk_correct(fc(feats.to(device)), labels).values()
        counts += torch.tensor([c1, c5, labels.numel()], dtype=torch.float64, device=device)
    if du.is_distributed():
        torch.distributed.all_reduce(counts)
    total = max(counts[2].item(), 1.0)
    return {"top1": 100.0 * counts[0].item() / total, "top5": 100.0 * counts[1].item() / total}


class FeatureSource:
    """Where the fc's inputs come from: a frozen backbone on images, or cached feature tensors.

    Training batches follow `sampler` (seeded by (seed, epoch), padded: every rank runs `len(self)` steps, or one
    would wait in DDP's all-reduce). `start_at(batch)` makes the next `train_batches` begin at that batch without
    producing the ones before it (a run resumed mid-epoch); it applies to one epoch only.
    """

    sampler: EpochSampler
    seed: int
    start: int = 0

    def start_at(self, batch: int) -> None:
        self.start = batch

    def _seed_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch_seed(epoch_seed(self.seed, epoch))
        self.sampler.start_at(self.start)
        self.start = 0

    def train_batches(self, epoch: int) -> Batches:
        raise NotImplementedError

    def val_batches(self) -> Batches:
        raise NotImplementedError

    def __len__(self) -> int:  # batches in a whole epoch, whatever start_at says
        return self.sampler.batches()

    def close(self) -> None:
        """Stop whatever loads the batches (loader workers); the next epoch would start it again."""


class BackboneSource(FeatureSource):
    """Images through the frozen backbone (eval mode, no grad); each training image's crop and flip seeded by
    (epoch seed, index), which the sampler's keys carry to the persistent loader workers."""

    def __init__(self, backbone: nn.Module, train_set: Any, val_set: Any, batch_size: int, workers: int,
                 device: torch.device, seed: int) -> None:
        self.backbone, self.device, self.seed = backbone, device, seed
        world, rank = du.world_size(), du.rank()
        per_rank = max(1, batch_size // world)
        self.sampler = EpochSampler(len(train_set), per_rank, world, rank, pad=True, keys=True)
        pin = device.type == "cuda"
        self.train_loader = torch.utils.data.DataLoader(
            SeededItems(train_set), batch_size=per_rank, sampler=self.sampler, num_workers=workers,
            pin_memory=pin, collate_fn=collate_with_skips, persistent_workers=workers > 0,
            worker_init_fn=loader_worker_init())
        shard = torch.utils.data.Subset(val_set, list(range(rank, len(val_set), world))) if world > 1 else val_set
        self.val_loader = torch.utils.data.DataLoader(
            shard, batch_size=per_rank, shuffle=False, num_workers=workers, pin_memory=pin,
            collate_fn=collate_with_skips, worker_init_fn=loader_worker_init())
        self.bad_paths: list[str] = []

    def _features(self, loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.backbone.eval()
        batches = iter(loader)
        try:
            for images, labels, bad in batches:
                self.bad_paths.extend(bad)
                with torch.no_grad():
                    feats = self.backbone(images.to(self.device, non_blocking=True))
                yield feats, labels
        finally:  # an epoch's workers end with it (left early too); persistent ones wait for close()
            if not loader.persistent_workers:
                shut_down_workers(batches)

    def train_batches(self, epoch: int) -> Batches:
        self._seed_epoch(epoch)
        return self._features(self.train_loader)

    def val_batches(self) -> Batches:
        return self._features(self.val_loader)

    def close(self) -> None:
        """Stop the persistent training workers now, not at interpreter exit (where PyTorch's shutdown is a no-op)."""
        shut_down_workers(self.train_loader)


class TensorSource(FeatureSource):
    """Cached features, reshuffled each epoch into mini-batches (batch_size <= 0: one full batch).
    `world`/`rank` default to the process group's."""

    def __init__(self, train_f: torch.Tensor, train_l: torch.Tensor, val_f: torch.Tensor, val_l: torch.Tensor,
                 batch_size: int, seed: int, world: int | None = None, rank: int | None = None) -> None:
        world = du.world_size() if world is None else world
        rank = du.rank() if rank is None else rank
        self.train_f, self.train_l = train_f, train_l
        self.val_f, self.val_l = val_f[rank::world], val_l[rank::world]
        self.per_rank = max(1, (batch_size if batch_size > 0 else len(train_f)) // world)
        self.seed, self.sampler = seed, EpochSampler(len(train_f), self.per_rank, world, rank, pad=True)

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._seed_epoch(epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(order), self.per_rank):
            idx = order[start:start + self.per_rank]
            yield self.train_f[idx], self.train_l[idx]

    def val_batches(self) -> Batches:
        for start in range(0, len(self.val_f), 4096):
            yield self.val_f[start:start + 4096], self.val_l[start:start + 4096]


def train_sgd(source: FeatureSource, in_features: int, num_classes: int, cfg: LinearConfig, device: torch.device,
              state_path: Path | None = None, resume: bool = False, meta: dict[str, Any] | None = None,
              after_first_epoch: Callable[[], None] | None = None, show_batches: bool = True,
              stop: StopRequest | None = None, open_log: Callable[[int], RunLog] | None = None) -> dict[str, Any]:
    """The SGD protocol on whatever `source` yields; per-epoch top-1/top-5, resumable from `state_path`.

    With `stop`, a signal ends training after the step in progress on every rank: the state, with the epoch's
    position and every rank's running loss, goes to `state_path` and StoppedBySignal is raised.
    `open_log(first_step)` opens the run's TensorBoard/W&B log; each epoch's row goes there at step = epoch.
    """
    cfg, _ = resolve_settings(cfg)  # no-op on a resolved config; a bare one gets the ImageNet protocol
    torch.manual_seed(cfg.seed)
    fc = fresh_fc(in_features, num_classes).to(device)
    model: nn.Module = fc
    if du.is_distributed():
        model = nn.parallel.DistributedDataParallel(fc, device_ids=[device.index] if device.type == "cuda" else None)
    lr0 = base_lr(cfg.batch_size, cfg.lr)
    milestones = cfg.milestones if cfg.milestones is not None else default_milestones(cfg.epochs)
    optimizer = torch.optim.SGD(fc.parameters(), lr=lr0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    history: list[dict[str, float]] = []
    start_epoch = 0
    mid: dict[str, Any] | None = None  # where a stopped epoch stood: step, per-rank loss sums and counts, seconds
    if resume and state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if meta and state.get("meta") != meta:
            raise CheckpointError(f"--resume {state_path}: written for another run ({state.get('meta')}); "
                                  f"this run is {meta}. Use another --output or drop --resume")
        fc.load_state_dict(state["fc"])
        optimizer.load_state_dict(state["optimizer"])
        history, start_epoch = list(state["history"]), int(state["epoch"])
        mid = state.get("mid_epoch")
        if mid is not None and len(mid["seen"]) != du.world_size():
            raise CheckpointError(f"--resume {state_path}: stopped mid-epoch with {len(mid['seen'])} "
                                  f"process(es), now {du.world_size()}; resume with as many")

    def save(epoch_done: int, extra: dict[str, Any] | None = None) -> Path | None:
        if state_path is not None and du.is_main_process():
            atomic_save({"epoch": epoch_done, "fc": fc.state_dict(), "optimizer": optimizer.state_dict(),
                         "history": history, "meta": meta or {}, **(extra or {})}, state_path)
        du.barrier()
        return state_path

    epochs_bar = progress(range(start_epoch, cfg.epochs), desc=f"linear {cfg.mode}", initial=start_epoch,
                          total=cfg.epochs, dynamic_ncols=True, disable=not du.is_main_process(), unit="epoch")
    # A resumed run continues its curves: what the stopped run logged after its state was saved is hidden.
    run_log = open_log(start_epoch + 1 if resume and (history or mid) else 0) if open_log else None
    loop = StepLoop("linear", stop, lambda at: save(at.epoch, {"mid_epoch": mid_epoch_record(at, device)}),
                    resume="--resume")

    def show(bar: Any, lr: float, rows: list[list[float]]) -> None:  # at each read of the step figures
        bar.set_postfix(loss=f"{rows[-1][0] / rows[-1][1]:.3f}", lr=f"{lr:.3g}",
                        img_s=f"{loop.position.seen * du.world_size() / max(loop.position.seconds, 1e-9):.0f}")

    for epoch in epochs_bar:
        lr = lr_at_epoch(lr0, epoch, cfg.epochs, False, milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        fc.train()
        resumed = mid is not None and mid["epoch"] == epoch
        start, states = resume_position(mid, SUMS) if resumed else (EpochPosition(epoch), {})
        restore_random_states(states, device)
        source.start_at(start.step)
        mid, steps = None, len(source)
        bar = progress(source.train_batches(epoch), total=steps, initial=start.step, leave=False, dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (show_batches and du.is_main_process()))
        for feats, labels in loop.run(bar, start, steps - start.step, SUMS, device, partial(show, bar, lr)):
            feats, labels = feats.to(device), labels.to(device)
            loss = F.cross_entropy(model(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loop.put(loss.detach() * labels.numel(), labels.numel())
        at = loop.position
        if epoch == start_epoch and after_first_epoch is not None:
            after_first_epoch()
        fc.eval()
        acc = evaluate(fc, source.val_batches(), device)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": du.all_reduce_mean(at.loss_sums / max(at.seen, 1), device),
               "top1": acc["top1"], "top5": acc["top5"], "train_seconds": at.seconds,
               "images_per_s": at.seen * du.world_size() / max(at.seconds, 1e-9)}
        history.append(row)
        if run_log is not None:  # flushed each epoch: a stop signal raises before any close
            run_log.scalars(row, epoch + 1, prefix="linear/")
            run_log.flush()
        epochs_bar.set_postfix(loss=f"{row['train_loss']:.3f}", lr=f"{lr:.3g}", top1=f"{acc['top1']:.2f}",
                               best=f"{max(h['top1'] for h in history):.2f}")
        save(epoch + 1)
        loop.stop_after(epoch, cfg.epochs, state_path)
    if run_log is not None:
        run_log.close()
    if not history:
        raise ValueError(f"linear: no epochs to run (epochs={cfg.epochs}, resumed at {start_epoch})")
    best = max(history, key=lambda h: h["top1"])
    return {"lr": lr0, "milestones": list(milestones), "history": history,
            "final": {"top1": history[-1]["top1"], "top5": history[-1]["top5"]},
            "best": {"top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"]},
            "fc": fc}


def train_lbfgs(train_f: torch.Tensor, train_l: torch.Tensor, val_f: torch.Tensor, val_l: torch.Tensor,
                num_classes: int, cfg: LinearConfig) -> dict[str, Any]:
    """Standardised features, multinomial logistic regression; C picked on a stratified held-out train part."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = train_f.numpy().astype(np.float64), train_l.numpy()
    xv, yv = val_f.numpy().astype(np.float64), val_l.numpy()
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 else None
    x_fit, x_hold, y_fit, y_hold = train_test_split(x, y, test_size=cfg.lbfgs_holdout, random_state=cfg.seed,
                                                    stratify=stratify)
    scaler = StandardScaler().fit(x_fit)
    search = []
    for c in progress(cfg.lbfgs_grid, desc="lbfgs: choosing C", dynamic_ncols=True):
        clf = LogisticRegression(C=c, max_iter=cfg.lbfgs_max_iter).fit(scaler.transform(x_fit), y_fit)
        search.append({"C": c, "holdout_top1": 100.0 * float((clf.predict(scaler.transform(x_hold)) == y_hold).mean())})
    best_c = max(search, key=lambda s: (s["holdout_top1"], -s["C"]))["C"]
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=best_c, max_iter=cfg.lbfgs_max_iter).fit(scaler.transform(x), y)
    proba = np.zeros((len(xv), num_classes))
    proba[:, clf.classes_] = clf.predict_proba(scaler.transform(xv))
    c1, c5 = topk_correct(torch.from_numpy(proba), torch.from_numpy(yv)).values()
    acc = {"top1": 100.0 * c1 / len(yv), "top5": 100.0 * c5 / len(yv)}
    return {"C": best_c, "search": search, "final": acc, "best": acc}


def divergence_warnings(history: list[dict[str, float]], num_classes: int) -> list[str]:
    """lr 30 suits MoCo's ImageNet features; on other features it can blow up, which users read as a bad model."""
    chance = math.log(max(num_classes, 2))
    losses = [h["train_loss"] for h in history]
    worst = next((x for x in losses if not math.isfinite(x)), max(losses, default=0.0))
    if not math.isfinite(worst) or worst > 10 * chance:
        return [f"training loss reached {worst:.3g} (chance level {chance:.2f}): the lr is too high for these "
                "features; pass a smaller --lr or use --solver lbfgs"]
    return []


def run_linear(checkpoint: str | os.PathLike, output: str | os.PathLike, data: str | os.PathLike | None = None,
               cfg: LinearConfig | None = None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
               resume: bool = False, device: str | None = None, monitors: MonitorOptions | None = None
               ) -> dict[str, Any]:
    """Evaluate `checkpoint` with `cfg.mode`; writes linear.json and linear_curve.png to `output`, and the
    per-epoch figures to TensorBoard / W&B as `monitors` say (rank 0).

    SGD training (faithful, cached) stops on SIGTERM/SIGUSR1 with StoppedBySignal after saving its state;
    feature extraction and lbfgs keep the signals' default actions (nothing of theirs could be saved).
    """
    cfg = cfg or LinearConfig()
    if cfg.mode not in MODES:
        raise ValueError(f"--solver/mode {cfg.mode!r}: expected one of {MODES}")
    if cfg.epochs is not None and cfg.epochs < 1 and cfg.mode != "lbfgs":
        raise ValueError(f"--epochs {cfg.epochs}: expected at least 1")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"--lr {cfg.lr}: expected a positive number")
    monitors = monitors or MonitorOptions()
    monitors.check()
    dev = du.pick_device(device)
    out = Path(output)
    pb: PretrainedBackbone = load_pretrained_backbone(checkpoint, dev)
    cfg, settings = resolve_settings(cfg, pb.preset_linear)
    faithful = cfg.mode == "faithful"
    train_tf = linear_train_transform(pb.image_size) if faithful else eval_transform(pb.image_size)
    pair = make_datasets(data or pb.embedded_data, train_tf, eval_transform(pb.image_size), pb.image_size,
                         all_ranks=True)  # every rank calls this: rank 0 alone scans a folder or list
    num_classes = len(pair.classes)
    meta = {"checkpoint": pb.fingerprint, "data": pair.root, "mode": cfg.mode, "epochs": cfg.epochs,
            "batch_size": cfg.batch_size, "lr": base_lr(cfg.batch_size, cfg.lr), "seed": cfg.seed}
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}

    def open_log(first_step: int) -> RunLog:
        return RunLog(out, monitors, name=f"linear {out.name}", first_step=first_step,
                      config={**meta, **asdict(cfg)}, main_process=du.is_main_process())

    if faithful:
        source = BackboneSource(pb.model, pair.train, pair.val, cfg.batch_size, cfg.workers, dev, cfg.seed)
        reference = snapshot(pb.model)
        with StopRequest() as stop:
            try:
                result = train_sgd(source, pb.feature_dim, num_classes, cfg, dev, out / STATE_NAME, resume, meta,
                                   after_first_epoch=lambda: assert_unchanged(pb.model, reference), stop=stop,
                                   open_log=open_log)
            finally:  # stopped, failed or done: the workers end here, with the signals still only flagged
                source.close()
        assert_unchanged(pb.model, reference)
        extra["backbone_unchanged"] = True
        extra["skipped_files"] = len(source.bad_paths)
    else:
        cache = FeatureCache(cache_dir) if use_cache and du.is_main_process() else None
        feats = backbone_features(pb, pair, dev, batch_size=max(cfg.batch_size, 64), workers=cfg.workers, cache=cache)
        extra["features_from_cache"] = feats.from_cache
        extra["feature_seconds"] = time.perf_counter() - t0
        if cfg.mode == "cached":
            source = TensorSource(feats.train_features, feats.train_labels, feats.val_features, feats.val_labels,
                                  cfg.batch_size, cfg.seed)
            with StopRequest() as stop:
                result = train_sgd(source, pb.feature_dim, num_classes, cfg, dev, out / STATE_NAME, resume, meta,
                                   show_batches=False, stop=stop, open_log=open_log)
        else:
            result = train_lbfgs(feats.train_features, feats.train_labels, feats.val_features, feats.val_labels,
                                 num_classes, cfg)
            with open_log(0) as run_log:
                run_log.scalars(result["final"], 0, prefix="linear/")
    result.pop("fc", None)
    extra["warnings"] = divergence_warnings(result.get("history", []), num_classes)
    report = {
        "protocol": {"faithful": "MoCo linear classification (frozen backbone, SGD, step schedule, augmented)",
                     "cached": "linear classifier on cached center-crop features (SGD, same schedule)",
                     "lbfgs": "L2-regularised logistic regression (L-BFGS), C chosen on held-out train"}[cfg.mode],
        "mode": cfg.mode, "checkpoint": str(pb.path.resolve()), "checkpoint_sha256": pb.fingerprint, "arch": pb.arch,
        "epoch": pb.epoch, "image_size": pb.image_size, "small_images": pb.small_images, "data": pair.root,
        "num_classes": num_classes, "num_train": len(pair.train), "num_val": len(pair.val),
        "hyperparameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "settings": settings,
        **result, **extra, "seconds": time.perf_counter() - t0, "world_size": du.world_size(), "device": str(dev),
    }
    if du.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(report, out / "linear.json")  # a diverged loss: null, with `warnings` saying why
        if cfg.mode == "lbfgs":
            save_curve([s["C"] for s in result["search"]], {"held-out top-1": [s["holdout_top1"]
                       for s in result["search"]]}, out / "linear_curve.png", "C (inverse L2 strength)",
                       f"L-BFGS regularisation search ({pb.arch})", log_x=True)
        else:
            hist = result["history"]
            save_curve([h["epoch"] for h in hist], {"val top-1": [h["top1"] for h in hist],
                                                   "val top-5": [h["top5"] for h in hist]},
                       out / "linear_curve.png", "epoch", f"linear probe, {cfg.mode} ({pb.arch})")
    return report
