"""The `moco` command: pretrain, convert, eval linear|knn|voc|coco, report.

Installed as `moco_transfer.cli`; commands are thin: they parse options and call the package's modules.
"""

from __future__ import annotations

import sys

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="moco-transfer")
def main() -> None:
    """Pretrain MoCo v2 ResNet encoders and measure them (linear, kNN, VOC detection)."""


@main.group("eval")
def eval_group() -> None:
    """Evaluate a pretrained checkpoint: linear classification, kNN retrieval, VOC detection."""


def _monitor_options(f):  # noqa: ANN001, ANN202 - a click decorator
    """--tensorboard/--no-tensorboard and --wandb [online|offline], shared by pretrain and the evaluators."""
    f = click.option("--wandb", type=click.Choice(["online", "offline"]), is_flag=False, flag_value="online",
                     default=None, help="Also log to Weights & Biases (needs the wandb package); offline for "
                                        "clusters without network (wandb sync later).")(f)
    return click.option("--tensorboard/--no-tensorboard", default=None,
                        help="TensorBoard event files in OUTPUT/tensorboard (default: on when tensorboard is "
                             "installed).")(f)


def _log_every_option(expose_value: bool = False):  # noqa: ANN202 - a click decorator
    """--log-every: when output is not a terminal, a plain progress line every N seconds replaces the bars."""

    def apply(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
        if value is not None:
            from moco_transfer.progress import set_log_every

            set_log_every(value)
        return value

    return click.option("--log-every", type=click.FloatRange(min=0), default=None, expose_value=expose_value,
                        callback=apply, help="Seconds between plain progress lines when the output is a log file, "
                                             "not a terminal (default 30; 0: none).")


def _download_option():  # noqa: ANN202 - a click decorator
    """--download: fetch a missing named set with torchvision's downloader (a process-wide switch, so that a
    resumed run need not repeat it and the evaluators' signatures need not carry it)."""

    def apply(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            from moco_transfer.named_sets import set_data_defaults

            set_data_defaults(download=True)
        return value

    return click.option("--download", is_flag=True, expose_value=False, callback=apply,
                        help="Download a missing named set (cifar10, ...) into --data-root with torchvision.")


def _eval_data_root_option():  # noqa: ANN202 - a click decorator
    """--data-root of the evaluators: where named sets' files are (docs/datasets.md)."""

    def apply(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            from moco_transfer.named_sets import set_data_defaults

            set_data_defaults(root=value)
        return value

    return click.option("--data-root", type=click.Path(file_okay=False), expose_value=False, callback=apply,
                        help="Folder of the named sets' files (default $MOCO_DATA_ROOT, else "
                             "~/.cache/moco_transfer/datasets).")


# --- pretrain -------------------------------------------------------------------------------------------


def _pretrain_options(f):  # noqa: ANN001, ANN202 - click decorator stack
    """Every option defaults to None so only what the user typed overrides the preset and --config."""
    opts = [
        click.option("--preset", type=click.Choice(["mocov1", "mocov2", "mocov2-800ep", "scattered-digits", "digits",
                                                     "cifar10-demo", "fashion-mnist"]),
                     help="Recipe; default: scattered-digits without a --data folder, mocov2 with one."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML or JSON file of options (names as below, dashes or underscores)."),
        click.option("--data", type=click.Path(),
                     help="Class-folder root (train/ used when present), a folder of images, a `path [label]` .txt "
                          "list, a named set (cifar10, cifar100, stl10, fashion-mnist, mnist, svhn), or "
                          "embedded:scattered-digits (the default) or embedded:digits (docs/datasets.md)."),
        click.option("--data-root", type=click.Path(file_okay=False),
                     help="Folder of the named sets' files (default $MOCO_DATA_ROOT, else "
                          "~/.cache/moco_transfer/datasets)."),
        _download_option(),
        click.option("--output", "-o", type=click.Path(file_okay=False), help="Checkpoint and log folder."),
        click.option("--resume", help="Checkpoint to continue from, or 'auto' for the newest in --output."),
        click.option("--force", is_flag=True, help="Start over in an --output that holds a run (its files move to "
                     "<output>/replaced-<time>/); without it such a folder is refused."),
        click.option("--arch", help="torchvision ResNet (resnet18 ... resnet152, resnext, wide_resnet)."),
        click.option("--small-images/--imagenet-stem", "small_images", default=None,
                     help="3x3 stride-1 stem without maxpool, for 32-64 px images."),
        click.option("--image-size", type=int, help="Crop size of the augmented views."),
        click.option("--crop-min", type=float, help="Smallest crop area fraction (0.2 in MoCo v1/v2)."),
        click.option("--flip/--no-flip", default=None, help="Mirror the views with p 0.5 (v1 and aug+ do)."),
        click.option("--epochs", type=int),
        click.option("--batch-size", type=int, help="Global batch size over all processes."),
        click.option("--base-lr", type=float, help="lr per 256 images (scaled linearly with --batch-size)."),
        click.option("--lr", type=float, help="Absolute lr; overrides --base-lr scaling."),
        click.option("--momentum", type=float),
        click.option("--weight-decay", "--wd", "weight_decay", type=float),
        click.option("--cos/--no-cos", default=None, help="Cosine lr (v2) or x0.1 steps at --schedule (v1)."),
        click.option("--schedule", type=int, multiple=True, help="Step-schedule epochs (repeat the option)."),
        click.option("--moco-dim", type=int, help="Feature dimension (128)."),
        click.option("--moco-k", type=int, help="Queue size (65536); a multiple of --batch-size."),
        click.option("--moco-m", type=float, help="Key-encoder momentum (0.999)."),
        click.option("--moco-t", type=float, help="Softmax temperature (v1 0.07, v2 0.2)."),
        click.option("--mlp/--no-mlp", default=None, help="2-layer MLP projection head (v2) or fc (v1)."),
        click.option("--aug-plus/--no-aug-plus", default=None, help="v2 augmentation with blur, or v1's."),
        click.option("--blur/--no-blur", default=None,
                     help="aug+'s Gaussian blur (p 0.5); --no-blur: aug+ without it, as the MoCo CIFAR-10 demo."),
        click.option("--head-bn/--no-head-bn", default=None,
                     help="BN without affine at the projection head's output (as MoCo v3's projector)."),
        click.option("--symmetric/--no-symmetric", default=None,
                     help="Symmetric loss: each view is also a query for the other's key (2 keys per image)."),
        click.option("--bn-splits", type=int, help="Single process: BN sub-batches imitating per-GPU BN."),
        click.option("--workers", "-j", type=int, help="Data-loading processes."),
        click.option("--seed", type=int),
        click.option("--amp", type=click.Choice(["none", "bf16", "fp16", "auto"]),
                     help="Autocast precision; auto: bf16 where the device computes it natively (AMX CPUs, "
                          "Ampere+ GPUs), else fp32."),
        click.option("--channels-last/--no-channels-last", default=None),
        click.option("--compile/--no-compile", "compile", default=None,
                     help="torch.compile both encoders (off by default: see docs/pipeline.md for when it pays)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"])),
        click.option("--knn-every", type=int, help="Run the kNN monitor every N epochs (0: off)."),
        click.option("--knn-data", type=click.Path(file_okay=False),
                     help="Labelled folder with train/ and val/ for the kNN monitor (default: --data)."),
        click.option("--knn-k", type=int),
        click.option("--knn-t", type=float),
        click.option("--keep-every", type=int, help="Also keep every N-th epoch's checkpoint."),
        click.option("--checkpoint-every-min", type=float,
                     help="Write a mid-epoch checkpoint every N minutes (default 30; 0: only at epoch ends)."),
        click.option("--print-baseline/--no-print-baseline", default=None,
                     help="At the end, kNN accuracy of the same architecture with random weights."),
        click.option("--data-pipeline", type=click.Choice(["auto", "cpu", "gpu"]),
                     help="cpu: workers decode and augment; gpu: workers read bytes, the device decodes and "
                          "augments (also runs on CPU tensors). auto: gpu on CUDA, else cpu."),
        click.option("--online-probe/--no-online-probe", default=None,
                     help="A linear classifier on the detached query features, trained beside MoCo; its top-1 on "
                          "the training stream each epoch (default: on when --data has labels)."),
        _monitor_options,
        _log_every_option(expose_value=True),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@_pretrain_options
def pretrain(config_file: str | None, resume: str | None, force: bool, schedule: tuple[int, ...],
             **options: object) -> None:
    """MoCo v2 pretraining (v1 and every ablation row by switches). Runs under torchrun for several processes."""
    from moco_transfer.checkpoint import CheckpointError
    from moco_transfer.data import DataError
    from moco_transfer.pretrain.config import ConfigError, resolve_config
    from moco_transfer.pretrain.engine import TrainingDiverged, run_pretraining
    from moco_transfer.pretrain.preemption import StoppedBySignal
    from moco_transfer.progress import set_log_every
    from moco_transfer.run_log import MonitorSetupError

    if schedule:
        options["schedule"] = list(schedule)
    try:
        cfg = resolve_config(options.pop("preset"), config_file, options)
        set_log_every(cfg.log_every)  # the kNN monitor's bars too; --config may set it
        run_pretraining(cfg, resume=resume, force=force)
    except (ConfigError, DataError, CheckpointError, MonitorSetupError) as exc:
        raise click.UsageError(str(exc)) from None
    except TrainingDiverged as exc:
        raise click.ClickException(str(exc)) from None
    except StoppedBySignal as exc:  # a graceful stop: exit code EXIT_STOPPED (75) tells a job script to requeue
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)


# --- convert --------------------------------------------------------------------------------------------


@main.command("convert")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str))
@click.argument("output", type=click.Path(dir_okay=False, path_type=str))
@click.option("--to", "target", type=click.Choice(["detectron2", "torchvision", "timm"]), default="detectron2",
              show_default=True, help="detectron2: .pkl of numpy arrays under detectron2 ResNet names; "
                                      "torchvision: state_dict for torchvision.models.<arch>() (no fc); "
                                      "timm: state_dict for timm.create_model(arch, pretrained=False, num_classes=0) "
                                      "(standard 7x7 stem only). An OUTPUT named *.safetensors is written with "
                                      "safetensors (torchvision and timm).")
@click.option("--arch", default=None, help="ResNet name when the checkpoint has no 'arch' entry (else inferred).")
@click.option("--force", is_flag=True, help="Overwrite OUTPUT if it exists.")
def convert_cmd(checkpoint: str, output: str, target: str, arch: str | None, force: bool) -> None:
    """Convert a MoCo CHECKPOINT's query-encoder backbone to OUTPUT for detectron2, torchvision or timm."""
    from moco_transfer.checkpoint import CheckpointError
    from moco_transfer.convert import convert

    try:
        summary = convert(checkpoint, output, target=target, force=force, arch=arch)
    except (CheckpointError, FileExistsError, IsADirectoryError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(summary.format())


# --- eval linear ----------------------------------------------------------------------------------------


@eval_group.command("linear")
@_log_every_option()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), default=None,
              help="Folder with train/ and val/ class folders, train.txt beside val.txt, a named set (cifar10, ...: "
                   "train and test), or embedded:NAME; default: the checkpoint's set.")
@_eval_data_root_option()
@_download_option()
@click.option("--output", "-o", type=click.Path(file_okay=False), default="linear_eval", show_default=True,
              help="Where linear.json, linear_curve.png and the per-epoch state go.")
@click.option("--cached", is_flag=True, help="Fast path: train the fc on cached center-crop features.")
@click.option("--solver", type=click.Choice(["sgd", "lbfgs"]), default="sgd", show_default=True,
              help="lbfgs: scikit-learn logistic regression on cached features, C chosen on held-out train.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Default 100, or the checkpoint's preset's linear settings (docs/eval.md).")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=256, show_default=True,
              help="Global batch (split across torchrun processes).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Base lr; default 30 x batch / 256, or the checkpoint's preset's lr per 256 images, scaled "
                   "alike (docs/eval.md).")
@click.option("--milestones", type=str, default=None,
              help="Epochs where lr drops x0.1, e.g. 60,80; default 60% and 80% of --epochs.")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUTPUT/linear_checkpoint.pth.tar (mid-epoch after "
              "SIGTERM/SIGUSR1, which save it and exit 75).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache folder (default ~/.cache/moco_transfer/features or $MOCO_CACHE_DIR).")
@click.option("--no-cache", is_flag=True, help="Extract features again and do not store them.")
@click.option("--device", type=str, default=None, help="cpu, cuda, cuda:1 ... (default: GPU when present).")
@_monitor_options
def eval_linear(checkpoint: str, data: str | None, output: str, cached: bool, solver: str, epochs: int | None,
                batch_size: int, lr: float | None, milestones: str | None, workers: int, seed: int, resume: bool,
                cache_dir: str | None, no_cache: bool, device: str | None, tensorboard: bool | None,
                wandb: str | None) -> None:
    """Linear classification on CHECKPOINT's frozen backbone (MoCo protocol; --cached or --solver lbfgs: fast)."""
    from moco_transfer.checkpoint import CheckpointError
    from moco_transfer.data import DataError
    from moco_transfer.eval.linear import LinearConfig, run_linear
    from moco_transfer.run_log import MonitorOptions
    from moco_transfer.signals import StoppedBySignal

    try:
        steps = tuple(int(m) for m in milestones.split(",")) if milestones else None
    except ValueError:
        raise click.UsageError(f"--milestones {milestones!r}: expected comma-separated epochs, e.g. 60,80") from None
    mode = "lbfgs" if solver == "lbfgs" else ("cached" if cached else "faithful")
    cfg = LinearConfig(mode=mode, epochs=epochs, batch_size=batch_size, lr=lr, milestones=steps, workers=workers,
                       seed=seed)
    try:
        report = run_linear(checkpoint, output, data, cfg, cache_dir, not no_cache, resume, device,
                            MonitorOptions(tensorboard, wandb))
    except (CheckpointError, DataError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    except StoppedBySignal as exc:  # state saved; exit code 75 tells a job script to requeue (then --resume)
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    for warning in report.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)
    best = report["best"]
    if mode != "lbfgs":
        hp = report["hyperparameters"]
        click.echo(f"settings: lr {report['lr']:g}, {hp['epochs']} epochs ({report['settings']})")
    click.echo(f"linear ({mode}) {report['arch']}: final top-1 {report['final']['top1']:.2f} "
               f"top-5 {report['final']['top5']:.2f}; best top-1 {best['top1']:.2f}; "
               f"results in {output}/linear.json")


# --- eval knn -------------------------------------------------------------------------------------------


@eval_group.command("knn")
@_log_every_option()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data", type=click.Path(), default=None,
              help="Folder with train/ (gallery) and val/ (queries), train.txt beside val.txt, a named set (cifar10, "
                   "...: train and test), or embedded:NAME; default: the checkpoint's set.")
@_eval_data_root_option()
@_download_option()
@click.option("--output", "-o", type=click.Path(file_okay=False), default="knn_eval", show_default=True,
              help="Where knn.json and knn_gallery.png go.")
@click.option("--k", "ks", type=str, default="10,20,100,200", show_default=True,
              help="Neighbour counts voted at once (comma-separated).")
@click.option("--temperature", "-t", type=click.FloatRange(min=0, min_open=True), default=0.07, show_default=True)
@click.option("--map-depth", type=click.IntRange(min=1), default=None,
              help="Truncate the mAP ranking to this many items (default: the whole gallery).")
@click.option("--backend", type=click.Choice(["auto", "faiss", "torch"]), default="auto", show_default=True)
@click.option("--query-batch", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Queries per search call (bounds memory).")
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per feature-extraction batch.")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Feature cache folder (default ~/.cache/moco_transfer/features or $MOCO_CACHE_DIR).")
@click.option("--no-cache", is_flag=True, help="Extract features again and do not store them.")
@click.option("--device", type=str, default=None, help="cpu, cuda, ... (default: GPU when present).")
@_monitor_options
def eval_knn(checkpoint: str, data: str | None, output: str, ks: str, temperature: float, map_depth: int | None,
             backend: str, query_batch: int, batch_size: int, workers: int, cache_dir: str | None, no_cache: bool,
             device: str | None, tensorboard: bool | None, wandb: str | None) -> None:
    """Weighted kNN top-1/top-5 and retrieval recall@1/5/10 + mAP of CHECKPOINT's features, with FAISS."""
    from moco_transfer.checkpoint import CheckpointError
    from moco_transfer.data import DataError
    from moco_transfer.eval.knn import KnnConfig, parse_ks, run_knn
    from moco_transfer.run_log import MonitorOptions

    try:
        k_values = parse_ks(ks)
    except ValueError:
        raise click.UsageError(f"--k {ks!r}: expected comma-separated positive integers, e.g. 10,20,100,200") from None
    cfg = KnnConfig(ks=k_values, temperature=temperature, map_depth=map_depth, backend=backend,
                    query_batch=query_batch, batch_size=batch_size, workers=workers)
    try:
        report = run_knn(checkpoint, output, data, cfg, cache_dir, not no_cache, device,
                         MonitorOptions(tensorboard, wandb))
    except (CheckpointError, DataError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    for k, acc in report["knn"].items():
        click.echo(f"kNN k={k:>4} T={temperature}: top-1 {acc['top1']:.2f}  top-5 {acc['top5']:.2f}")
    click.echo("retrieval: " + "  ".join(f"{name} {value:.2f}" for name, value in report["retrieval"].items()
                                          if name != "queries_scored"))
    click.echo(f"results in {output}/knn.json, gallery {report['gallery']}")


# --- eval voc, eval coco -------------------------------------------------------------------------------


def _detection_options(root_option: str, root_help: str, default_trials: int, config_default: str,
                       config_help: str):  # noqa: ANN202 - click decorator stack
    """The options `moco eval voc` and `moco eval coco` share; only the dataset root and the defaults differ."""
    opts = [
        _log_every_option(),
        click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=str)),
        click.option(root_option, "data_root", required=True, type=click.Path(path_type=str), help=root_help),
        click.option("--output", "output", default=None, type=click.Path(file_okay=False, path_type=str),
                     help="Run folder (trials, summary); default runs/<benchmark>/<checkpoint stem>-<sha256[:8]>"
                          "[-<config>][-opts<hash>][-seed<N>] (docs/voc.md)."),
        click.option("--trials", default=default_trials, show_default=True, type=int,
                     help="Independent fine-tuning runs (seeds differ)."),
        click.option("--gpus", default=None, type=int,
                     help="GPUs of the run (0 = CPU), split between --parallel-trials; default: all visible, "
                          "else CPU."),
        click.option("--parallel-trials", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Trials at once, each on gpus/parallel-trials GPUs in its own process "
                          "(see docs/detection.md)."),
        click.option("--amp", is_flag=True,
                     help="fp16 mixed precision (detectron2's AMP trainer): the protocol's 16 images on fewer GPUs."),
        click.option("--fresh", is_flag=True,
                     help="Move the output folder's earlier trials to superseded/<time>/ and start over."),
        click.option("--config", default=config_default, show_default=True, help=config_help),
        click.option("--seed", default=0, show_default=True, type=int, help="Base seed; trial k uses seed+k."),
        click.option("--scale-to-gpus", is_flag=True,
                     help="Apply the MoCo authors' rule for fewer than 8 GPUs (8 images, lr/2, 2x schedule) and "
                          "print it."),
        click.option("--max-ims-per-gpu", default=4, show_default=True, type=int,
                     help="With --scale-to-gpus: images per GPU that fit in memory; keeps 16 per batch when they "
                          "fit."),
        click.argument("opts", nargs=-1, type=click.UNPROCESSED, metavar="[--opts KEY VALUE ...]"),
    ]

    def wrap(f):  # noqa: ANN001, ANN202
        for opt in reversed(opts):
            f = opt(f)
        return f

    return wrap


def _run_detection(benchmark: str, checkpoint: str, data_root: str, output: str | None, trials: int,
                   gpus: int | None, parallel_trials: int, amp: bool, fresh: bool, config: str, seed: int,
                   scale_to_gpus: bool, max_ims_per_gpu: int, opts: tuple[str, ...]) -> None:
    """Both commands: the options checked, the runner called, its errors as messages, the mean line printed."""
    from pathlib import Path

    from moco_transfer.eval.detection.benchmarks import get_benchmark
    from moco_transfer.eval.detection.runner import REPORTED_ERRORS, DetectionOptions, run_detection
    from moco_transfer.signals import StoppedBySignal

    if opts and opts[0] != "--opts":
        raise click.UsageError(f"unexpected arguments {' '.join(opts)}; detectron2 overrides go after --opts")
    stray = [o for o in opts if o.startswith("--") and o != "--opts"]
    if stray:
        raise click.UsageError(f"no such option {stray[0]} (options go before --opts KEY VALUE ...)")
    bm = get_benchmark(benchmark)
    ckpt = Path(checkpoint)
    options = DetectionOptions(
        checkpoint=ckpt, data_root=Path(data_root), benchmark=bm,
        output=Path(output) if output else None,
        trials=trials, gpus=gpus, config=config,
        opts=[o for o in opts if o != "--opts"], seed=seed, scale_to_gpus=scale_to_gpus,
        max_ims_per_gpu=max_ims_per_gpu, amp=amp, parallel_trials=parallel_trials, fresh=fresh)
    try:
        summary = run_detection(options, echo=click.echo)
    except REPORTED_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    except StoppedBySignal as exc:  # trials saved their checkpoints; exit code 75 tells a job script to requeue
        click.echo(str(exc), err=True)
        sys.exit(exc.exit_code)
    values = bm.values(summary["mean"]) or {}
    spread = bm.values(summary["std"]) or {}
    parts = []
    for task, key, header in bm.columns():
        mean = values.get(task, {}).get(key)
        if mean is not None and key in ("AP", "AP50", "AP75"):
            std = spread.get(task, {}).get(key)
            parts.append(f"{header} {mean:.2f}" + (f" +- {std:.2f}" if std is not None else ""))
    click.echo(f"{summary['trials_finished']} trials: " + ", ".join(parts))


@eval_group.command("voc", context_settings={"ignore_unknown_options": True})
@_detection_options("--voc-root", "Folder holding VOC2007/ and VOC2012/ (the VOCdevkit folder).", 5,
                    "voc_R_50_C4_24k_moco.yaml",
                    "A shipped config name (see docs/voc.md) or a path to a detectron2 YAML file.")
def eval_voc(checkpoint: str, data_root: str, output: str | None, trials: int, gpus: int | None,
             parallel_trials: int, amp: bool, fresh: bool, config: str, seed: int, scale_to_gpus: bool,
             max_ims_per_gpu: int, opts: tuple[str, ...]) -> None:
    """Fine-tune CHECKPOINT (MoCo checkpoint or detectron2 .pkl) on VOC07+12, test on VOC07; N trials, summary.

    Re-running the same command skips finished trials and resumes an interrupted one. Put detectron2 config
    overrides last: --opts SOLVER.MAX_ITER 100 INPUT.MIN_SIZE_TEST 600.
    """
    _run_detection("voc", checkpoint, data_root, output, trials, gpus, parallel_trials, amp, fresh, config, seed,
                   scale_to_gpus, max_ims_per_gpu, opts)


@eval_group.command("coco", context_settings={"ignore_unknown_options": True})
@_detection_options("--coco-root", "Folder in detectron2's COCO layout: annotations/instances_{train,val}2017.json, "
                    "train2017/, val2017/.", 1, "fpn-1x",
                    "c4-1x, c4-2x, fpn-1x or fpn-2x (Mask R-CNN, docs/detection.md), or a path to a detectron2 "
                    "YAML file.")
def eval_coco(checkpoint: str, data_root: str, output: str | None, trials: int, gpus: int | None,
              parallel_trials: int, amp: bool, fresh: bool, config: str, seed: int, scale_to_gpus: bool,
              max_ims_per_gpu: int, opts: tuple[str, ...]) -> None:
    """Fine-tune CHECKPOINT (MoCo checkpoint or detectron2 .pkl) with Mask R-CNN on COCO train2017, test on val2017.

    Box and mask AP (COCOEvaluator); N trials (default 1: a trial is long, and the paper reports single runs),
    mean and std. Re-running the same command skips finished trials and resumes an interrupted one. Put
    detectron2 config overrides last: --opts SOLVER.MAX_ITER 100.
    """
    _run_detection("coco", checkpoint, data_root, output, trials, gpus, parallel_trials, amp, fresh, config, seed,
                   scale_to_gpus, max_ims_per_gpu, opts)


# --- report ---------------------------------------------------------------------------------------------


@main.command("report")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=str))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Also write the table to this Markdown file (atomically) and a bar chart beside it (.png).")
@click.option("--group-by", type=click.Choice(["checkpoint", "recipe"]), default="checkpoint", show_default=True,
              help="recipe: pool checkpoints whose pretraining configs differ only in seed (mean ± std over them).")
@click.option("--knn-k", "knn_ks", type=click.IntRange(min=1), multiple=True,
              help="k values taken from knn.json files (repeatable; default 200; a file without them shows all its k).")
@click.option("--decimals", type=click.IntRange(min=0, max=4), default=1, show_default=True)
def report_cmd(paths: tuple[str, ...], output: str | None, group_by: str, knn_ks: tuple[int, ...],
               decimals: int) -> None:
    """One table of the results found under PATHS (pretraining runs, eval linear/knn/voc), tech-report layout."""
    from moco_transfer.eval.report import ReportError, build_report, write_report

    try:
        report = build_report(paths, group_by, knn_ks or None, decimals)
    except ReportError as exc:
        raise click.UsageError(str(exc)) from None
    for line in report.skipped:
        click.echo(f"warning: skipped {line}", err=True)
    click.echo(report.markdown, nl=False)
    if output:
        md, png = write_report(report, output)
        click.echo(f"wrote {md} and {png}", err=True)


if __name__ == "__main__":
    main()
