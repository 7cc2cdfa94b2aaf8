"""Pretraining configuration: defaults, presets for every row of the MoCo v2 ablation, file loading.

Precedence: dataclass defaults < preset < config file (YAML or JSON) < command-line options.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moco_transfer.data import embedded_name
from moco_transfer.fileio import atomic_open


@dataclass
class PretrainConfig:
    preset: str = "mocov2"
    data: str | None = None            # class folders (train/ when present), list.txt, named set, embedded:NAME
    data_root: str | None = None       # named sets' files; None: $MOCO_DATA_ROOT, else ~/.cache/moco_transfer/datasets
    output: str = "runs/pretrain"
    arch: str = "resnet50"
    small_images: bool = False         # 3x3 stride-1 stem without maxpool, for 32-64 px images
    image_size: int = 224
    crop_min: float = 0.2              # smallest RandomResizedCrop area fraction of the views
    flip: bool = True                  # mirror views with p 0.5 (aug+ and v1 do; a mirrored digit is another glyph)
    epochs: int = 200
    batch_size: int = 256              # global, over all processes
    base_lr: float = 0.03              # per 256 images; the lr used is base_lr * batch_size / 256
    lr: float | None = None            # absolute lr; overrides base_lr scaling
    momentum: float = 0.9
    weight_decay: float = 1e-4
    cos: bool = True                   # cosine schedule (v2); otherwise x0.1 at `schedule` epochs (v1)
    schedule: list[int] = field(default_factory=lambda: [120, 160])
    moco_dim: int = 128
    moco_k: int = 65536
    moco_m: float = 0.999
    moco_t: float = 0.2
    mlp: bool = True
    aug_plus: bool = True
    blur: bool = True                  # aug+'s Gaussian blur (the MoCo CIFAR-10 demo's aug+ has none); v1 has none
    symmetric: bool = False            # also use each key view as a query (the MoCo CIFAR demo's option)
    head_bn: bool = False              # BN without affine on the head's output (MoCo v3's projector ends so)
    bn_splits: int = 8                 # single process: split BN over sub-batches of the shuffled keys
    workers: int = 8
    seed: int = 0
    amp: str = "none"                  # none | bf16 | fp16 (CUDA only) | auto (bf16 where the device computes it)
    channels_last: bool = False
    compile: bool = False              # torch.compile the encoders (in place: checkpoint keys stay as they are)
    device: str = "auto"               # auto | cpu | cuda
    knn_every: int = 0                 # epochs between kNN monitor runs (0: off)
    knn_data: str | None = None        # folder with train/ and val/ class folders; None: the pretraining data
    knn_k: int = 200
    knn_t: float = 0.07
    keep_every: int = 0                # also keep every N-th epoch's checkpoint (0: only the newest)
    checkpoint_every_min: float = 30.0  # mid-epoch checkpoint every N minutes (0: off); see docs/cluster.md
    print_baseline: bool = False       # compare with a random-weights encoder at the end (kNN)
    data_pipeline: str = "auto"        # auto | cpu | gpu: decode + augment in workers (cpu) or on the device
    log_every: float = 30.0            # seconds between plain progress lines when output is not a terminal
    online_probe: bool | None = None   # linear probe on the query features during training; None: when labelled
    tensorboard: bool | None = None    # event files in <output>/tensorboard; None: when the package is installed
    wandb: str | None = None           # Weights & Biases: online | offline; None: off

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


AMP_CHOICES = ("none", "bf16", "fp16", "auto")


def bf16_in_hardware(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bfloat16 natively, and the reason, for `--amp auto`.

    On a CPU without AMX or AVX512-BF16, bf16 autocast is emulated and slower than fp32; with AMX (this
    project's 2-core box) a MoCo step at 28 px ran 3.1x faster (46.5 -> 145 images/s, docs/real_data.md).
    torch.cpu's probes are private, hence getattr: a torch without them counts as no hardware support.
    """
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, "the GPU has bfloat16 tensor cores" if ok else "the GPU has no native bfloat16"
    for probe, name in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
        if getattr(torch.cpu, probe, lambda: False)():
            return True, f"the CPU has {name}"
    return False, "the CPU has neither AMX nor AVX512-BF16 (bfloat16 would be emulated, slower than fp32)"


def resolve_amp(amp: str, device: torch.device) -> tuple[str, str]:
    """`--amp auto` made concrete for `device`: ("bf16" or "none", why); other values pass through."""
    if amp != "auto":
        return amp, ""
    ok, why = bf16_in_hardware(device)
    return ("bf16" if ok else "none"), why


_V2 = dict(mlp=True, aug_plus=True, cos=True, moco_t=0.2)
PRESETS: dict[str, dict[str, Any]] = {
    "mocov1": dict(mlp=False, aug_plus=False, cos=False, moco_t=0.07, epochs=200),
    "mocov2": dict(_V2, epochs=200),
    "mocov2-800ep": dict(_V2, epochs=800),
    # The embedded default (no --data): scattered digits, about 4 minutes on 2 CPU cores. At this scale the
    # v2 recipe needs three changes to learn (docs/small_scale.md): BN at the head's output, crops of at least
    # 80% of the image, and no mirror (a mirrored digit is another glyph).
    # Its linear-probe settings (lr 0.03 per 256 images, measured) are PRESET_LINEAR in moco_transfer/pretrained.py,
    # where the evaluators read them; `moco eval linear` uses them for checkpoints of this preset.
    "scattered-digits": dict(_V2, data="embedded:scattered-digits", arch="resnet18", small_images=True,
                             image_size=16, crop_min=0.8, flip=False, head_bn=True, epochs=30, batch_size=64,
                             base_lr=0.24, moco_k=1024, moco_m=0.99, moco_t=0.2, bn_splits=4, workers=1,
                             knn_every=3, knn_k=20, print_baseline=True, output="runs/scattered-digits"),
    # The plain, centred 8x8 digits: random weights already reach ~94% kNN here, so it shows little.
    "digits": dict(_V2, data="embedded:digits", arch="resnet18", small_images=True, image_size=16, crop_min=0.5,
                   epochs=8, batch_size=64, base_lr=0.24, moco_k=1024, moco_m=0.99, bn_splits=4, workers=1,
                   knn_every=4, knn_k=20, print_baseline=True, output="runs/digits"),
    # The MoCo authors' CIFAR-10 demo (their Colab notebook, facebookresearch/moco branch colab-notebook): ResNet-18
    # with the 3x3 stride-1 stem and no max-pool, batch 512, lr 0.06 absolute, wd 5e-4, cosine, K 4096, m 0.99,
    # T 0.1, split BN over 8 sub-batches, aug+ without blur and with crops from 8% (RandomResizedCrop's default),
    # and a kNN monitor (k 200, T 0.1) on the test split. Published kNN top-1 at 200 epochs: 82.6% (symmetric
    # loss: 85.3%); docs/real_data.md. mlp is False because the demo's encoder is the ResNet itself with a 128-d
    # fc as its last layer (ModelBase(num_classes=128)): a linear head, as in MoCo v1. Not the demo's: the views
    # are normalised with ImageNet's mean and std (the demo: CIFAR-10's), and the kNN monitor's test images are
    # resized to 37 px and centre-cropped to 32 (this project's eval transform; the demo uses them as they are).
    "cifar10-demo": dict(data="cifar10", arch="resnet18", small_images=True, image_size=32, crop_min=0.08,
                         flip=True, aug_plus=True, blur=False, epochs=200, batch_size=512, lr=0.06, momentum=0.9,
                         weight_decay=5e-4, cos=True, moco_dim=128, moco_k=4096, moco_m=0.99, moco_t=0.1,
                         mlp=False, bn_splits=8, knn_every=10, knn_k=200, knn_t=0.1, output="runs/cifar10-demo"),
    # Fashion-MNIST (60k 28 px grayscale training images) sized for a 2-core CPU with AMX: bf16 autocast (--amp
    # auto) runs about 110 images/s there, 9 min per epoch, so 10 epochs and benchmarks/real_data.py's evaluation
    # take under 2 hours. From the embedded preset's findings (docs/small_scale.md): BN at the head's output,
    # crops of at least 80%, no mirror (Fashion-MNIST draws its shoes facing one way), and its lr of 0.24 per 256
    # images (the 1-epoch trial at 0.06 learned slowly; solo-learn's CIFAR MoCo v2+ uses 0.3 at batch 256). No
    # blur: at 28 px aug+'s sigma is at most 0.25 px. docs/real_data.md has the reasons and the figures.
    "fashion-mnist": dict(_V2, data="fashion-mnist", arch="resnet18", small_images=True, image_size=28, crop_min=0.8,
                          flip=False, blur=False, head_bn=True, epochs=10, batch_size=256, base_lr=0.24,
                          moco_k=4096, moco_m=0.99, moco_t=0.2, bn_splits=8, workers=1, amp="auto", knn_every=0,
                          knn_k=20, knn_t=0.07, output="runs/fashion-mnist"),
}
DEFAULT_PRESET = "scattered-digits"
FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


class ConfigError(ValueError):
    """A config file or option with an unknown key or a value of the wrong kind."""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"--config {path}: not valid {kind}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _check_keys(values: dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a file value against the field's type (JSON/YAML give ints for floats and lists for tuples)."""
    default = FIELDS[name].default
    if value is None or name == "schedule":
        if name == "schedule" and not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
            raise ConfigError(f"{source}: 'schedule' must be a list of epochs, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name!r} must be true or false, got {value!r}")
    elif isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name!r} must be an integer, got {value!r}")
    elif isinstance(default, float) or name == "lr":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name!r} must be a number, got {value!r}")
        value = float(value)
    elif not isinstance(value, str):
        raise ConfigError(f"{source}: {name!r} must be a string, got {value!r}")
    return value


def resolve_config(preset: str | None = None, config_file: str | os.PathLike | None = None,
                   overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Merge preset, file and command-line values into one validated config."""
    file_values = load_config_file(config_file) if config_file else {}
    _check_keys(file_values, f"--config {config_file}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(overrides, "options")
    data_given = overrides.get("data") or file_values.get("data")
    # A folder, a list or a named set (cifar10, ...) is real data: the published recipe, unless a preset is given.
    real_data = data_given and embedded_name(data_given) is None
    name = (overrides.get("preset") or preset or file_values.get("preset")
            or ("mocov2" if real_data else DEFAULT_PRESET))
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: expected one of {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[name])
    values.update({k: _coerce(k, v, f"--config {config_file}") for k, v in file_values.items()})
    values.update(overrides)
    values["preset"] = name
    cfg = PretrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    def bad(option: str, expected: str) -> None:
        raise ConfigError(f"--{option.replace('_', '-')} {getattr(cfg, option)!r}: expected {expected}")

    for name in ("epochs", "batch_size", "moco_dim", "moco_k", "image_size", "bn_splits"):
        if getattr(cfg, name) < 1:
            bad(name, "a positive integer")
    if cfg.workers < 0:
        bad("workers", "0 or more")
    if not 0.0 <= cfg.moco_m < 1.0:
        bad("moco_m", "a momentum in [0, 1)")
    if not 0.0 < cfg.crop_min <= 1.0:
        bad("crop_min", "an area fraction in (0, 1]")
    if cfg.moco_t <= 0:
        bad("moco_t", "a positive temperature")
    if cfg.moco_k % (cfg.batch_size * (2 if cfg.symmetric else 1)):
        need = (f"2 x --batch-size = {2 * cfg.batch_size} with --symmetric (both key batches enter the queue)"
                if cfg.symmetric else f"--batch-size {cfg.batch_size} (the queue takes whole batches)")
        raise ConfigError(f"--moco-k {cfg.moco_k} must be a multiple of {need}")
    if cfg.amp not in AMP_CHOICES:
        bad("amp", "none, bf16, fp16 or auto")
    if cfg.device not in ("auto", "cpu", "cuda"):
        bad("device", "auto, cpu or cuda")
    if cfg.data_pipeline not in ("auto", "cpu", "gpu"):
        bad("data_pipeline", "auto, cpu or gpu")
    if not cfg.log_every >= 0:
        bad("log_every", "0 (no progress lines) or a number of seconds")
    if cfg.wandb not in (None, "online", "offline"):
        bad("wandb", "online or offline (or leave it out)")
    if not cfg.checkpoint_every_min >= 0:
        bad("checkpoint_every_min", "0 (only epoch checkpoints) or a number of minutes")


def save_resolved(cfg: PretrainConfig, folder: str | os.PathLike) -> Path:
    """The config actually used, as YAML beside the checkpoints (loadable again with --config)."""
    path = Path(folder) / "config.yaml"
    with atomic_open(path, "w") as f:
        f.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
