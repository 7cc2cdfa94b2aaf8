"""Export: `moco convert --to timm`, safetensors outputs, and `moco eval`'s loading of them (issue 23, part 3)."""

from __future__ import annotations

import io
import re
import struct
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from moco_transfer.backbone import build_resnet
from moco_transfer.builder import MoCo
from moco_transfer.checkpoint import CheckpointError, with_module_prefix
from moco_transfer.cli import main
from moco_transfer.convert import convert
from moco_transfer.pretrained import load_pretrained_backbone

DOCS = Path(__file__).resolve().parents[1] / "docs" / "eval.md"


def _moco_checkpoint(path: Path, arch: str, small_images: bool = False, seed: int = 0) -> Path:
    """A MoCo v2 checkpoint in this project's layout, made by the project's own builder, with distinct BN buffers
    and affines (so a swapped or dropped statistic changes the outputs). Means stay near 0: means near 1 would
    push every activation below the ReLUs and make the features all zero, whatever the weights."""
    torch.manual_seed(seed)
    model = MoCo(partial(build_resnet, arch, small_images=small_images), dim=128, K=256, mlp=True)
    with torch.no_grad():
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if ".bn" in name or ".downsample.1." in name:
                if name.endswith("running_mean") or name.endswith(".bias"):
                    tensor.normal_(0, 0.1)
                elif name.endswith(("running_var", ".weight")):
                    tensor.uniform_(0.5, 1.5)
    config = {"arch": arch, "small_images": small_images, "image_size": 32 if small_images else 64, "mlp": True}
    torch.save({"epoch": 3, "arch": arch, "state_dict": with_module_prefix(model.state_dict()), "optimizer": {},
                "config": config}, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    return {arch: _moco_checkpoint(folder / f"{arch}.pth.tar", arch) for arch in ("resnet18", "resnet50")}


def _torchvision_features(arch: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """torchvision.models.<arch>() holding the --to torchvision output; fc (not in the file) is the identity."""
    net = getattr(torchvision.models, arch)()
    net.fc = nn.Identity()
    net.load_state_dict(weights, strict=True)
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_timm_round_trip_equals_torchvision(arch: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    src = checkpoints[arch]
    summary = convert(src, tmp_path / "timm.pth", target="timm")
    assert summary.missing_in_target == [] and summary.skipped_head == ["fc.0.bias", "fc.0.weight", "fc.2.bias",
                                                                        "fc.2.weight"]
    assert f"timm.create_model('{arch}', pretrained=False, num_classes=0)" in summary.format()
    convert(src, tmp_path / "tv.pth", target="torchvision")

    model = timm.create_model(arch, pretrained=False, num_classes=0)
    model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    model.eval()
    source = torch.load(src, weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():  # every tensor, by value: a dead channel would hide in outputs
        assert torch.equal(value, source[f"module.encoder_q.{key}"]), key
    reference = _torchvision_features(arch, torch.load(tmp_path / "tv.pth", weights_only=True))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(x), reference(x)
        fresh = timm.create_model(arch, pretrained=False, num_classes=0).eval()(x)
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, 512 if arch == "resnet18" else 2048)
    assert (want > 0).float().mean() > 0.5  # live features: all-zero ones would match whatever was loaded
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fresh, want, atol=1e-3)  # the weights, not the architecture, make them equal


@pytest.mark.parametrize("target", ["torchvision", "timm"])
def test_safetensors_output_equals_pickle(target: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    src = checkpoints["resnet18"]
    convert(src, tmp_path / "w.pth", target=target)
    summary = convert(src, tmp_path / "w.safetensors", target=target)
    pickled = torch.load(tmp_path / "w.pth", weights_only=True)
    stored = load_file(tmp_path / "w.safetensors")
    assert set(stored) == set(pickled) and len(stored) == summary.tensors == 120
    for key, value in pickled.items():
        assert stored[key].dtype == value.dtype, key
        assert torch.equal(stored[key], value), key
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet18" and meta["target"] == target and meta["epoch"] == "3"
    assert meta["source"] == str(src) and meta["image_size"] == "64"
    assert "safetensors.torch.load_file(" in summary.format()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth", "w.safetensors"]  # no temporary file left
    with pytest.raises(FileExistsError, match="--force"):
        convert(src, tmp_path / "w.safetensors", target=target)


def test_detectron2_safetensors_name_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r18.safetensors"
    with pytest.raises(ValueError, match=r"detectron2 reads converted weights from a pickle \(\.pkl\)"):
        convert(checkpoints["resnet18"], out, target="detectron2")
    res = CliRunner().invoke(main, ["convert", str(checkpoints["resnet18"]), str(out)])
    assert res.exit_code == 1 and "r18.pkl" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_small_images_checkpoint_refused_for_timm(tmp_path: Path) -> None:
    src = _moco_checkpoint(tmp_path / "cifar.pth.tar", "resnet18", small_images=True)
    out = tmp_path / "timm.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {src}: pretrained with small_images=True")):
        convert(src, out, target="timm")
    res = CliRunner().invoke(main, ["convert", str(src), str(out), "--to", "timm"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().count("\n") == 0 and "timm's resnet18 (7x7 stride-2 stem, max-pool)" in res.output
    # --to torchvision keeps its behaviour: the shape check names conv1
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e\.g\. conv1\.weight"):
        convert(src, tmp_path / "tv.safetensors", target="torchvision")
    assert not out.exists() and not (tmp_path / "tv.safetensors").exists()


@pytest.mark.parametrize("target", ["torchvision", "timm"])
def test_eval_loader_reads_safetensors(target: str, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    src = checkpoints["resnet18"]
    out = tmp_path / "r18.safetensors"
    convert(src, out, target=target)
    pb = load_pretrained_backbone(out)
    original = load_pretrained_backbone(src)  # the pickled checkpoint, through torch.load(weights_only=True)
    assert (pb.arch, pb.small_images, pb.image_size, pb.epoch, pb.feature_dim) == ("resnet18", False, 64, 3, 512)
    assert (original.arch, original.image_size, original.epoch) == ("resnet18", 64, 3)
    assert not pb.model.training and not any(p.requires_grad for p in pb.model.parameters())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pb.model(x), original.model(x), rtol=0, atol=0)
    assert len(pb.fingerprint) == 64 and pb.fingerprint != original.fingerprint


def test_eval_loader_validates_safetensors_keys(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    convert(checkpoints["resnet18"], tmp_path / "good.safetensors", target="timm")
    tensors = load_file(tmp_path / "good.safetensors")
    meta = {"arch": "resnet18"}
    save_file({k: v for k, v in tensors.items() if not k.startswith("layer4.")}, tmp_path / "partial.safetensors",
              metadata=meta)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors: query encoder does not match torchvision "
                                              r"resnet18: \d+ missing \(e\.g\. layer4\.0\."):
        load_pretrained_backbone(tmp_path / "partial.safetensors")
    save_file({**tensors, "fc.weight": torch.zeros(10, 512)}, tmp_path / "extra.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. fc\.weight\)"):
        load_pretrained_backbone(tmp_path / "extra.safetensors")
    small = MoCo(partial(build_resnet, "resnet18", small_images=True), dim=16, K=32).encoder_q.state_dict()
    save_file({k: v for k, v in small.items() if not k.startswith("fc.")}, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(e\.g\. conv1\.weight"):
        load_pretrained_backbone(tmp_path / "small.safetensors")  # arch inferred; the 3x3 stem is refused
    save_file(tensors, tmp_path / "badmeta.safetensors", metadata={"arch": "resnet18", "image_size": "huge"})
    with pytest.raises(CheckpointError, match=r"header metadata 'image_size' is 'huge', not an integer"):
        load_pretrained_backbone(tmp_path / "badmeta.safetensors")


def _torch_save_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(2)}, buffer)
    return buffer.getvalue()


def _tampered(good: bytes) -> dict[str, tuple[bytes, str]]:
    """Damaged copies of a safetensors file, each with the words the refusal must contain."""
    header_len = struct.unpack("<Q", good[:8])[0]
    flipped = bytearray(good)
    for i in range(8 + header_len // 2, 8 + header_len // 2 + 4):
        flipped[i] ^= 0xFF  # bytes in the middle of the JSON header
    renamed = bytearray(good)
    start = good.index(b'"dtype"', 8)
    renamed[start + 1] = ord("x")  # the JSON stays valid text but loses a field
    return {
        "flipped": (bytes(flipped), "the header is not valid"),
        "renamed": (bytes(renamed), "the header is not valid safetensors JSON"),
        "truncated": (good[:-100], "the tensor data does not fill the file exactly"),
        "header-cut": (good[: 8 + header_len // 2], "the header length points past the end of the file"),
        "empty": (b"", "the file is shorter than the 8-byte header length"),
        "torch-save": (_torch_save_bytes(), "the header length is implausible"),
    }


def test_tampered_safetensors_is_refused(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    convert(checkpoints["resnet18"], good, target="torchvision")
    for name, (data, words) in _tampered(good.read_bytes()).items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            load_pretrained_backbone(path)
        message = str(info.value)
        assert message.startswith(f"weights {path}: not a valid safetensors file: {words}"), (name, message)
        assert "\n" not in message, name
    # through the command: a usage error naming the file, no traceback
    res = CliRunner().invoke(main, ["eval", "knn", str(tmp_path / "truncated.safetensors"), "-o",
                                    str(tmp_path / "knn"), "--device", "cpu"])
    assert res.exit_code == 2 and "truncated.safetensors: not a valid safetensors file" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output


def test_cli_convert_to_timm_safetensors(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r18_moco.safetensors"
    res = CliRunner().invoke(main, ["convert", str(checkpoints["resnet18"]), str(out), "--to", "timm"])
    assert res.exit_code == 0, res.output
    assert "target timm, arch resnet18, epoch 3" in res.output and "tensors written: 120" in res.output
    assert "left for the target" not in res.output
    assert (f"load with: model = timm.create_model('resnet18', pretrained=False, num_classes=0); "
            f"model.load_state_dict(safetensors.torch.load_file('{out}'))") in res.output


def _docs_snippets() -> dict[str, str]:
    """The Python blocks of docs/eval.md's export section, by the library they load into."""
    text = DOCS.read_text()
    section = text[text.index("### Using the weights in timm and torchvision"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {("timm" if "timm.create_model" in b else "torchvision"): b for b in blocks[:2]}


def test_docs_snippets_run(checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    snippets = _docs_snippets()
    assert set(snippets) == {"timm", "torchvision"}
    assert all(len(code.strip().splitlines()) == 3 for code in snippets.values())
    monkeypatch.chdir(tmp_path)
    convert(checkpoints["resnet50"], "r50_moco.safetensors", target="timm")  # the docs' two commands
    convert(checkpoints["resnet50"], "r50_moco_tv.safetensors", target="torchvision")
    x = torch.randn(1, 3, 64, 64)
    outputs = []
    for name in ("timm", "torchvision"):
        scope: dict[str, object] = {}
        exec(compile(snippets[name], f"docs/eval.md ({name})", "exec"), scope)  # the docs' own lines
        model = scope["model"]
        assert isinstance(model, nn.Module)
        with torch.no_grad():
            outputs.append(model.eval()(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
