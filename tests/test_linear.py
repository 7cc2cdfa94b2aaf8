"""The linear protocol: schedule and init, frozen backbone, resume, DDP equivalence, L-BFGS, CLI end to end."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from moco_transfer.augment import eval_transform, linear_train_transform
from moco_transfer.checkpoint import CheckpointError
from moco_transfer.cli import main
from moco_transfer.data import make_datasets
from moco_transfer.eval.linear import (
    BackboneSource,
    LinearConfig,
    TensorSource,
    assert_unchanged,
    base_lr,
    default_milestones,
    fresh_fc,
    snapshot,
    train_lbfgs,
    train_sgd,
)
from moco_transfer.pretrained import load_pretrained_backbone
from moco_transfer.schedule import lr_at_epoch

from .eval_helpers import make_checkpoint, make_image_folder

CPU = torch.device("cpu")


def test_schedule_and_lr_scaling() -> None:
    assert default_milestones(100) == (60, 80)
    assert default_milestones(10) == (6, 8)
    assert [lr_at_epoch(30.0, e, 100, False, (60, 80)) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx(
        [30, 30, 3, 3, 0.3, 0.3])
    assert base_lr(256) == 30.0 and base_lr(512) == 60.0 and base_lr(64) == 7.5
    assert base_lr(512, lr=10.0) == 10.0


def test_fresh_fc_init() -> None:
    torch.manual_seed(0)
    fc = fresh_fc(2048, 1000)
    assert fc.weight.shape == (1000, 2048)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.01)
    assert abs(fc.weight.mean().item()) < 1e-4
    assert torch.count_nonzero(fc.bias).item() == 0


def separable(n: int, seed: int, dim: int = 8, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.eye(classes, dim) * 3
    return centres[labels] + 0.5 * torch.randn(n, dim, generator=g), labels


def test_cached_sgd_learns_and_follows_the_schedule() -> None:
    xf, yf = separable(600, 0)
    xv, yv = separable(200, 1)
    cfg = LinearConfig(mode="cached", epochs=5, batch_size=64, lr=0.5)
    res = train_sgd(TensorSource(xf, yf, xv, yv, 64, seed=0), 8, 4, cfg, CPU, show_batches=False)
    assert [h["lr"] for h in res["history"]] == pytest.approx([0.5, 0.5, 0.5, 0.05, 0.5 * 0.01])
    assert res["milestones"] == [3, 4]
    assert res["final"]["top1"] > 95 and res["best"]["top1"] >= res["final"]["top1"]
    assert res["history"][-1]["train_loss"] < res["history"][0]["train_loss"]


class Interrupt(Exception):
    pass


class InterruptedSource(TensorSource):
    def train_batches(self, epoch: int):  # noqa: ANN201
        if epoch == 2:
            raise Interrupt
        return super().train_batches(epoch)


def test_resume_continues_exactly(tmp_path: Path) -> None:
    xf, yf = separable(300, 0)
    xv, yv = separable(100, 1)
    cfg = LinearConfig(mode="cached", epochs=4, batch_size=32, lr=0.2)
    meta = {"run": "a"}
    full = train_sgd(TensorSource(xf, yf, xv, yv, 32, 0), 8, 4, cfg, CPU, tmp_path / "full.pth.tar", meta=meta,
                     show_batches=False)
    state = tmp_path / "cut.pth.tar"
    with pytest.raises(Interrupt):
        train_sgd(InterruptedSource(xf, yf, xv, yv, 32, 0), 8, 4, cfg, CPU, state, meta=meta, show_batches=False)
    assert torch.load(state, weights_only=True)["epoch"] == 2
    resumed = train_sgd(TensorSource(xf, yf, xv, yv, 32, 0), 8, 4, cfg, CPU, state, resume=True, meta=meta,
                        show_batches=False)
    assert torch.allclose(resumed["fc"].weight, full["fc"].weight, atol=1e-6)
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx([h["train_loss"] for h in full["history"]])
    with pytest.raises(CheckpointError, match="written for another run"):
        train_sgd(TensorSource(xf, yf, xv, yv, 32, 0), 8, 4, cfg, CPU, state, resume=True, meta={"run": "b"})


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    xf, yf = separable(600, 0)
    xv, yv = separable(200, 1)
    cfg = LinearConfig(mode="cached", epochs=3, batch_size=256, lr=0.5)
    res = train_sgd(TensorSource(xf, yf, xv, yv, 256, 0), 8, 4, cfg, CPU, show_batches=False)
    if rank == 0:
        torch.save({"weight": res["fc"].weight.detach(), "history": res["history"]}, out)
    torch.distributed.destroy_process_group()


def test_ddp_on_two_processes_matches_one(tmp_path: Path) -> None:
    """Each rank takes every other sample of the same shuffled batch; averaged gradients = the global batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    xf, yf = separable(600, 0)
    xv, yv = separable(200, 1)
    cfg = LinearConfig(mode="cached", epochs=3, batch_size=256, lr=0.5)
    single = train_sgd(TensorSource(xf, yf, xv, yv, 256, 0), 8, 4, cfg, CPU, show_batches=False)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert torch.allclose(ddp["weight"], single["fc"].weight, atol=1e-5)
    assert [h["top1"] for h in ddp["history"]] == pytest.approx([h["top1"] for h in single["history"]])


def test_divergence_is_reported() -> None:
    from moco_transfer.eval.linear import divergence_warnings

    assert divergence_warnings([{"train_loss": 2.0}, {"train_loss": 1.5}], 10) == []
    assert "smaller --lr" in divergence_warnings([{"train_loss": 2.0}, {"train_loss": 1e4}], 10)[0]
    assert "nan" in divergence_warnings([{"train_loss": 2.0}, {"train_loss": float("nan")}], 10)[0]


def test_lbfgs_picks_c_on_held_out_train() -> None:
    xf, yf = separable(400, 0)
    xv, yv = separable(100, 1)
    res = train_lbfgs(xf, yf, xv, yv, 4, LinearConfig(mode="lbfgs", lbfgs_grid=(1e-4, 1.0)))
    assert [s["C"] for s in res["search"]] == [1e-4, 1.0]
    best = max(s["holdout_top1"] for s in res["search"])
    # the chosen C scores best on the held-out part; ties go to the stronger regularisation (smaller C)
    assert res["C"] == min(s["C"] for s in res["search"] if s["holdout_top1"] == best)
    assert res["final"]["top1"] > 95 and res["final"]["top5"] == 100.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("linear")
    return make_checkpoint(root / "ck.pth.tar", image_size=16), make_image_folder(root / "data", per_class=6)


def test_frozen_backbone_unchanged_even_if_left_in_train_mode(tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    pb = load_pretrained_backbone(ckpt)
    pair = make_datasets(data, linear_train_transform(16), eval_transform(16), 16)
    before = snapshot(pb.model)
    pb.model.train()  # BN running stats would move if the source did not put the backbone in eval mode
    source = BackboneSource(pb.model, pair.train, pair.val, batch_size=6, workers=0, device=CPU, seed=0)
    res = train_sgd(source, 512, 3, LinearConfig(epochs=2, batch_size=6, lr=0.01), CPU, show_batches=False,
                    after_first_epoch=lambda: assert_unchanged(pb.model, before))
    assert_unchanged(pb.model, before)
    assert not torch.equal(res["fc"].bias, torch.zeros(3))  # the classifier did train
    with torch.no_grad():
        pb.model.bn1.running_mean.add_(1.0)
    with pytest.raises(RuntimeError, match=r"backbone changed.*bn1\.running_mean"):
        assert_unchanged(pb.model, before)


def test_moco_eval_linear_faithful_then_resume(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    args = ["eval", "linear", str(ckpt), "--data", str(data), "-o", str(tmp_path / "out"), "--epochs", "2",
            "-b", "6", "--lr", "0.01", "-j", "0"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "linear.json").read_text())
    assert report["mode"] == "faithful" and report["backbone_unchanged"] is True
    assert [h["epoch"] for h in report["history"]] == [1, 2] and report["milestones"] == [1, 2]
    assert report["hyperparameters"]["momentum"] == 0.9 and report["hyperparameters"]["weight_decay"] == 0.0
    assert report["num_classes"] == 3 and 0 <= report["final"]["top1"] <= 100
    assert (tmp_path / "out" / "linear_curve.png").stat().st_size > 1000
    assert (tmp_path / "out" / "linear_checkpoint.pth.tar").is_file()
    again = CliRunner().invoke(main, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "out" / "linear.json").read_text())["history"] == report["history"]
    other = CliRunner().invoke(main, [*args[:-4], "--lr", "0.02", "-j", "0", "--resume"])
    assert other.exit_code == 2 and "written for another run" in other.output


def test_moco_eval_linear_cached_and_lbfgs(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    common = [str(ckpt), "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "-j", "0"]
    r = CliRunner().invoke(main, ["eval", "linear", *common, "-o", str(tmp_path / "c"), "--cached", "--epochs", "5",
                                  "-b", "18", "--lr", "0.05"])
    assert r.exit_code == 0, r.output
    cached = json.loads((tmp_path / "c" / "linear.json").read_text())
    assert cached["mode"] == "cached" and cached["features_from_cache"] == {"train": False, "val": False}
    # learning itself is checked on synthetic features above; random-network features are too ill-conditioned
    # for plain SGD to be asserted on here, so this checks the run: epochs, schedule, finite losses
    assert [h["lr"] for h in cached["history"]] == pytest.approx([0.05, 0.05, 0.05, 0.005, 0.0005])
    assert all(h["train_loss"] == h["train_loss"] < float("inf") for h in cached["history"])
    r = CliRunner().invoke(main, ["eval", "linear", *common, "-o", str(tmp_path / "l"), "--solver", "lbfgs"])
    assert r.exit_code == 0, r.output
    lbfgs = json.loads((tmp_path / "l" / "linear.json").read_text())
    assert lbfgs["features_from_cache"] == {"train": True, "val": True}  # reused from the --cached run
    assert lbfgs["final"]["top1"] > 90 and lbfgs["C"] in lbfgs["hyperparameters"]["lbfgs_grid"]


def test_a_diverged_loss_is_null_in_linear_json_with_its_warning(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    r = CliRunner().invoke(main, ["eval", "linear", str(ckpt), "--data", str(data), "--no-cache", "-j", "0",
                                  "-o", str(tmp_path), "--cached", "--epochs", "3", "-b", "18", "--lr", "1e38"])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "linear.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert None in [h["train_loss"] for h in report["history"]]
    assert "smaller --lr" in report["warnings"][0]


def test_moco_eval_linear_bad_inputs(tmp_path: Path, tiny: tuple[Path, Path]) -> None:
    ckpt, data = tiny
    run = lambda *a: CliRunner().invoke(main, ["eval", "linear", "-o", str(tmp_path / "o"), "--no-cache", *a])  # noqa: E731
    r = run(str(ckpt), "--data", str(tmp_path / "nowhere"))
    assert r.exit_code == 2 and "folder not found" in r.output
    empty = make_image_folder(tmp_path / "e", {"train": ["a"], "val": ["a"]}, per_class=1)
    for f in (empty / "train" / "a").iterdir():
        f.unlink()
    r = run(str(ckpt), "--data", str(empty), "--cached")
    assert r.exit_code == 2 and "no images" in r.output
    r = run(str(tmp_path / "missing.pth.tar"))
    assert r.exit_code == 2 and "file not found" in r.output
    r = run(str(ckpt), "--milestones", "sixty")
    assert r.exit_code == 2 and "--milestones" in r.output
