"""`moco report` on hand-made result files: merging per checkpoint, missing cells, protocols, trials, grouping."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from moco_transfer.cli import main
from moco_transfer.eval import report as report_module
from moco_transfer.eval.detection.benchmarks import COCO
from moco_transfer.eval.detection.trials import summarize, trial_dir, write_metrics
from moco_transfer.eval.report import Cell, ReportError, build_report, chart_labels, format_cell, write_report
from moco_transfer.fileio import sha256_file
from moco_transfer.pretrain.config import PretrainConfig, save_resolved

from .eval_helpers import make_checkpoint, make_image_folder

DIGITS = "<embedded digits 16px>"


def write_run(folder: Path, seed: int = 0, epochs: int = 8, knn: float | None = None,
              random_init: float | None = None, summary: bool = True, knn_in_log: bool = True,
              **recipe: Any) -> Path:
    """A pretraining run folder as `moco pretrain` leaves it: config.yaml, log.jsonl, pretrain.json, checkpoint."""
    settings = dict(preset="digits", arch="resnet18", small_images=True, image_size=16, batch_size=64, moco_k=1024,
                    knn_k=20)
    cfg = PretrainConfig(**{**settings, **recipe}, epochs=epochs, seed=seed, output=str(folder))
    save_resolved(cfg, folder)
    history = [{"epoch": e + 1, "loss": 6.0 - 0.1 * e, "lr": 0.06, "acc1": 50.0, "images_per_s": 60.0,
                "skipped_files": 0} for e in range(epochs)]
    if knn is not None and knn_in_log:
        history[-1]["knn_top1"] = knn
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    ckpt = folder / f"checkpoint_{epochs - 1:04d}.pth.tar"
    weights = {"w": torch.full((2,), seed)}  # distinct bytes per seed, so distinct sha256
    torch.save({"epoch": epochs, "arch": cfg.arch, "config": cfg.to_dict(), "state_dict": weights}, ckpt)
    if summary:
        record: dict[str, Any] = {"epochs": epochs, "checkpoint": f"runs/elsewhere/{ckpt.name}", "last": history[-1],
                                  "knn_k": 20, "knn_t": 0.07, "knn_data": DIGITS}
        if knn is not None:
            record["knn_top1"] = knn
        if random_init is not None:
            record["knn_top1_random_init"] = random_init
        (folder / "pretrain.json").write_text(json.dumps(record))
    return ckpt


def write_linear(folder: Path, ckpt: Path, top1: float, mode: str = "cached", epochs: int = 100,
                 data: str = DIGITS, lr: float = 30.0) -> None:
    """The fields `moco eval linear` writes to linear.json (eval/linear.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    report = {"protocol": "...", "mode": mode, "checkpoint": str(ckpt.resolve()),
              "checkpoint_sha256": sha256_file(ckpt),
              "arch": "resnet18", "epoch": torch.load(ckpt, weights_only=True)["epoch"], "data": data,
              "hyperparameters": {"mode": mode, "epochs": epochs, "batch_size": 256, "lr": None, "seed": 0},
              "final": {"top1": top1, "top5": 99.0}, "best": {"top1": top1 + 1, "top5": 99.0, "epoch": 3}}
    if mode != "lbfgs":
        report["lr"] = lr
    (folder / "linear.json").write_text(json.dumps(report))


def write_knn(folder: Path, ckpt: Path, top1: dict[int, float], data: str = DIGITS, t: float = 0.07) -> None:
    """The fields `moco eval knn` writes to knn.json (eval/knn.py)."""
    folder.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": sha256_file(ckpt),
              "epoch": torch.load(ckpt, weights_only=True)["epoch"], "data": data,
              "hyperparameters": {"ks": sorted(top1), "temperature": t},
              "knn": {str(k): {"top1": v, "top5": 100.0} for k, v in top1.items()}}
    (folder / "knn.json").write_text(json.dumps(report))


def write_voc(folder: Path, ckpt: Path, trials: list[tuple[float, float, float]], requested: int,
              config: str = "voc_R_50_C4_24k_moco.yaml", opts: tuple[str, ...] = (),
              config_sha256: str = "c0ffee" * 10) -> None:
    """A VOC run folder: run.json (the fingerprint `moco eval voc` pins: the checkpoint's sha256 and that of the
    training target, i.e. the config with --opts merged), then the real trial bookkeeping (metrics, summary)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"version": 2, "benchmark": "voc", "config": {},
                                                 "checkpoint_sha256": sha256_file(ckpt),
                                                 "config_sha256": config_sha256}))
    for k, (ap50, ap, ap75) in enumerate(trials):
        write_metrics(trial_dir(folder, k), {"AP50": ap50, "AP": ap, "AP75": ap75}, seed=k)
    summarize(folder, requested, {"checkpoint": "relative/ck.pth.tar", "weights": "w.pkl", "config": config,
                                  "opts": list(opts)})


def parse(markdown: str) -> tuple[list[str], list[dict[str, str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in lines]
    headers = split[0]
    return headers, [dict(zip(headers, cells, strict=True)) for cells in split[2:]]


def row_of(rows: list[dict[str, str]], needle: str) -> dict[str, str]:
    hits = [r for r in rows if needle in r.get("checkpoint", r.get("recipe", ""))]
    assert len(hits) == 1, (needle, rows)
    return hits[0]


def test_evaluations_of_one_checkpoint_share_a_row_and_missing_cells_show_a_dash(tmp_path: Path) -> None:
    a = write_run(tmp_path / "runs" / "a", seed=0, knn=71.25, mlp=True, aug_plus=True, cos=True, moco_t=0.2)
    b = write_run(tmp_path / "runs" / "b", seed=1, knn=None, summary=False, mlp=False, aug_plus=False, cos=False,
                  moco_t=0.07)
    write_linear(tmp_path / "evals" / "a_linear", a, 80.5)
    write_knn(tmp_path / "evals" / "b_knn", b, {20: 60.0, 200: 55.5})
    report = build_report([tmp_path])
    headers, rows = parse(report.markdown)
    assert headers[:7] == ["checkpoint", "MLP", "aug+", "cos", "T", "epochs", "batch"]
    assert len(rows) == 2  # one row per checkpoint: a's run and its linear eval merged (same sha256)
    ra, rb = row_of(rows, "runs/a/checkpoint_0007"), row_of(rows, "runs/b/checkpoint_0007")
    assert (ra["MLP"], ra["aug+"], ra["cos"], ra["T"], ra["epochs"], ra["batch"]) == ("✓", "✓", "✓", "0.2", "8", "64")
    assert (rb["MLP"], rb["aug+"], rb["cos"], rb["T"]) == ("", "", "", "0.07")
    assert ra["linear top-1"] == "80.5" and rb["linear top-1"] == "–"
    monitor = next(h for h in headers if "monitor" in h)
    evalknn = next(h for h in headers if "eval knn" in h)
    assert ra[monitor] == "71.2" and rb[monitor] == "–"  # b's log has no kNN value: never invented
    assert rb[evalknn] == "55.5" and ra[evalknn] == "–"  # k=200 by default
    for family in ("VOC AP50", "VOC AP", "VOC AP75"):
        assert ra[family] == rb[family] == "–"
        assert f"- **{family}**: no result found" in report.markdown


def test_monitor_value_only_from_the_last_epoch(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, knn=None, summary=False)
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    lines[3]["knn_top1"] = 50.0  # an earlier epoch's monitor value belongs to another checkpoint
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _, rows = parse(build_report([run]).markdown)
    assert [v for k, v in rows[0].items() if k.startswith("kNN")] == ["–"]
    lines[-1]["knn_top1"] = 64.0
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    headers, rows = parse(build_report([run]).markdown)
    assert headers[-4] == "kNN top-1" and rows[0]["kNN top-1"] == "64.0"
    assert "the pretraining run's kNN monitor" in build_report([run]).markdown
    assert "k 20, T 0.07, data embedded (digits preset, 16px)" in build_report([run]).markdown


def test_mixed_protocols_get_separate_columns(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", seed=0)
    b = write_run(tmp_path / "b", seed=1)
    write_linear(tmp_path / "la", a, 70.0, mode="cached")
    write_linear(tmp_path / "lb", b, 75.0, mode="lbfgs")
    write_knn(tmp_path / "ka", a, {200: 40.0}, data="/datasets/imagenet")
    write_knn(tmp_path / "kb", b, {200: 45.0})
    report = build_report([tmp_path])
    headers, rows = parse(report.markdown)
    ra, rb = row_of(rows, "a/checkpoint"), row_of(rows, "b/checkpoint")
    linear = [h for h in headers if h.startswith("linear")]
    assert linear == ["linear top-1 (cached, 100 ep, lr 30)", "linear top-1 (lbfgs)"]
    cached, lbfgs = linear
    assert (ra[cached], ra[lbfgs], rb[cached], rb[lbfgs]) == ("70.0", "–", "–", "75.0")
    knn = sorted(h for h in headers if h.startswith("kNN"))
    assert knn == ["kNN top-1 (embedded digits 16px)", "kNN top-1 (imagenet)"]
    assert ra["kNN top-1 (imagenet)"] == "40.0" and ra["kNN top-1 (embedded digits 16px)"] == "–"
    assert rb["kNN top-1 (embedded digits 16px)"] == "45.0"
    # every column's full protocol is written under the table
    assert "- **kNN top-1 (imagenet)**: `moco eval knn`, weighted kNN top-1 (%); k 200, T 0.07, " \
           "data /datasets/imagenet" in report.markdown
    assert f"- **{lbfgs}**: `moco eval linear`, top-1 (%) of the final epoch; mode lbfgs, data {DIGITS}" \
        in report.markdown


def test_knn_k_choice_and_linear_epochs_split(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a", seed=0)
    write_knn(tmp_path / "k", a, {20: 61.0, 200: 58.0})
    write_linear(tmp_path / "l100", a, 70.0, epochs=100)
    write_linear(tmp_path / "l20", a, 66.0, epochs=20)
    headers, rows = parse(build_report([tmp_path], knn_ks=[20, 200]).markdown)
    assert rows[0]["kNN top-1 (k=20)"] == "61.0" and rows[0]["kNN top-1 (k=200)"] == "58.0"
    assert rows[0]["linear top-1 (100 ep)"] == "70.0" and rows[0]["linear top-1 (20 ep)"] == "66.0"
    # a knn.json without the asked-for k contributes the k values it has rather than nothing
    headers, rows = parse(build_report([tmp_path / "k"], knn_ks=[10]).markdown)
    assert rows[0]["kNN top-1 (k=20)"] == "61.0" and rows[0]["kNN top-1 (k=200)"] == "58.0"


def test_voc_trials_give_mean_std_and_count(tmp_path: Path) -> None:
    a = write_run(tmp_path / "runs" / "a", seed=0)
    b = write_run(tmp_path / "runs" / "b", seed=1)
    full = [(82.1, 57.0, 63.5), (82.4, 57.2, 63.9), (82.2, 56.8, 63.1), (82.6, 57.1, 64.0), (82.3, 57.4, 63.6)]
    write_voc(tmp_path / "voc" / "a", a, full, requested=5)
    write_voc(tmp_path / "voc" / "b", b, full[:3], requested=5)
    (tmp_path / "voc" / "a" / "trial_0" / "last_checkpoint").write_text("x")  # detectron2 files are not results
    # trials `moco eval voc` moved aside (another checkpoint or config) are not reported, and the notes say so
    write_voc(tmp_path / "voc" / "a" / "superseded" / "20240101-000000", b, [(10.0, 5.0, 6.0)], requested=5)
    headers, rows = parse(build_report([tmp_path]).markdown)
    ra, rb = row_of(rows, "runs/a/"), row_of(rows, "runs/b/")
    for i, family in enumerate(("VOC AP50", "VOC AP", "VOC AP75")):
        values = [t[i] for t in full]
        assert ra[family] == f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f} (n=5)"
        assert rb[family] == f"{statistics.fmean(values[:3]):.1f} ± {statistics.stdev(values[:3]):.1f} (n=3 of 5)"
    assert ra["VOC AP"] == "57.1 ± 0.2 (n=5)"
    report = build_report([tmp_path / "voc"])  # without the runs: tied by sha256 only, recipe unknown
    _, rows = parse(report.markdown)
    assert len(rows) == 2 and all("(sha256 " in r["checkpoint"] and r["MLP"] == "–" for r in rows)
    assert "config c4-24k, opts none, config sha256 c0ffeec0ffee" in report.markdown  # the shipped file's choice
    assert "superseded: superseded VOC trials, not reported" in report.markdown
    _, rows = parse(build_report([tmp_path / "voc" / "a" / "superseded"]).markdown)  # asked for by name
    assert len(rows) == 1 and rows[0]["VOC AP50"] == "10.0 (n=1 of 5)"


def test_group_by_recipe_pools_seeds(tmp_path: Path) -> None:
    values = {"v1": [60.0, 61.0, 62.5], "v2": [67.0, 67.5, 68.5]}
    for name, switches in (("v1", dict(mlp=False, aug_plus=False, cos=False, moco_t=0.07)),
                           ("v2", dict(mlp=True, aug_plus=True, cos=True, moco_t=0.2))):
        for seed, top1 in enumerate(values[name]):
            ckpt = write_run(tmp_path / f"{name}_s{seed}", seed=seed, knn=top1 - 10, random_init=30.0 + seed,
                             **switches)
            write_linear(tmp_path / f"{name}_s{seed}_linear", ckpt, top1)
            if (name, seed) == ("v2", 0):
                write_linear(tmp_path / "v2_s0_lbfgs", ckpt, 69.0, mode="lbfgs")
    wide = write_run(tmp_path / "wide", seed=0, arch="resnet50", mlp=True, aug_plus=True, cos=True, moco_t=0.2)
    write_linear(tmp_path / "wide_linear", wide, 70.0)

    _, per_ckpt = parse(build_report([tmp_path]).markdown)
    assert len(per_ckpt) == 7 + 3  # 7 checkpoints (seeds are not pooled by default), 3 random-init baselines
    # v1 and v2 runs with seed 1 measured the same random network: one result, not two
    assert row_of(per_ckpt, "16px, seed 1)")["kNN top-1"] == "31.0"

    report = build_report([tmp_path], group_by="recipe")
    headers, rows = parse(report.markdown)
    assert headers[0] == "recipe" and len(rows) == 4
    base, v1, *v2s = rows
    assert base["recipe"] == "random init (resnet18, small stem, 16px, seeds 0, 1, 2)"
    assert base["MLP"] == "n/a" and base["kNN top-1"] == "31.0 ± 1.0 (n=3)"
    assert base["linear top-1 (cached, 100 ep, lr 30)"] == "–"
    assert v1["recipe"] == "digits (seeds 0, 1, 2)" and v1["MLP"] == ""
    mean, std = statistics.fmean(values["v1"]), statistics.stdev(values["v1"])
    assert v1["linear top-1 (cached, 100 ep, lr 30)"] == f"{mean:.1f} ± {std:.1f} (n=3)" == "61.2 ± 1.3 (n=3)"
    assert v1["kNN top-1"] == "51.2 ± 1.3 (n=3)"
    # same switches but another architecture: not pooled, and the label says how the recipes differ
    v2 = row_of(rows, "digits (seeds 0, 1, 2) [arch resnet18]")
    assert v2["linear top-1 (cached, 100 ep, lr 30)"] == "67.7 ± 0.8 (n=3)" and v2["MLP"] == "✓"
    assert v2["linear top-1 (lbfgs)"] == "69.0 (n=1 of 3)"  # one seed of three has it, and the cell says so
    assert row_of(rows, "[arch resnet50]")["linear top-1 (cached, 100 ep, lr 30)"] == "70.0"
    assert "n = checkpoints" in report.markdown


V1 = dict(mlp=False, aug_plus=False, cos=False, moco_t=0.07)
MLP_T02 = dict(mlp=True, aug_plus=False, cos=False, moco_t=0.2)
V2 = dict(mlp=True, aug_plus=True, cos=True, moco_t=0.2)


def test_chart_labels_name_what_tells_the_rows_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/ablation.md's chart named every bar group "<preset> (seeds 0, 1, 2)": its rows could not be told apart."""
    for name, switches in (("v1", V1), ("mlp", MLP_T02), ("v2", V2)):
        for seed in (0, 1):
            ckpt = write_run(tmp_path / f"{name}_s{seed}", seed=seed, knn=40.0 + seed, random_init=30.0, **switches)
            write_linear(tmp_path / f"{name}_s{seed}_linear", ckpt, 50.0 + seed)
    drawn: dict[str, Any] = {}
    monkeypatch.setattr(report_module, "save_bars", lambda groups, series, path, title: drawn.update(
        groups=list(groups), title=title) or path)

    report = build_report([tmp_path], group_by="recipe")
    assert [r.label for r in report.rows if r.recipe] == ["digits (seeds 0, 1)"] * 3  # the table relies on switches
    write_report(report, tmp_path / "table.md")
    assert drawn["groups"][0].startswith("random init (")
    # named from the table's own cells: the switch columns that differ between the recipe rows
    assert drawn["groups"][1:] == ["no MLP, no aug+, no cos, T 0.07", "MLP, no aug+, no cos, T 0.2",
                                   "MLP, aug+, cos, T 0.2"]
    assert drawn["title"] == "moco report, per recipe: digits (seeds 0, 1) (error bars: std)"

    # per checkpoint: each row's label (its checkpoint) differs, so it follows the switches on a second line
    rows = build_report([tmp_path]).rows
    labels, shared = chart_labels(rows)
    v2 = [label for label in labels if label.startswith("MLP, aug+, cos")]
    assert v2 == [f"MLP, aug+, cos, T 0.2\n{row.label}" for row in rows if "/v2_s" in row.label]
    assert [label.split("/")[-2] for label in v2] == ["v2_s0", "v2_s1"]
    assert len(set(labels)) == len(labels) and shared == ""

    # switches alike, another recipe field differs: the label the table shows, with that field in brackets
    write_run(tmp_path / "wide", seed=0, arch="resnet50", knn=45.0, **V2)
    labels, _ = chart_labels(build_report([tmp_path / "v2_s0", tmp_path / "wide"], group_by="recipe").rows)
    assert labels[1:] == ["digits (seed 0) [arch resnet18]", "digits (seed 0) [arch resnet50]"]  # after random init
    # one recipe row alone keeps its label
    labels, shared = chart_labels(build_report([tmp_path / "v2_s0", tmp_path / "v2_s1"], group_by="recipe").rows)
    assert labels[-1] == "digits (seeds 0, 1)" and shared == ""


def test_two_voc_protocols_keep_separate_columns(tmp_path: Path) -> None:
    """Another config, or the same config with other --opts, is another protocol: never one cell."""
    a = write_run(tmp_path / "runs" / "a", seed=0)
    b = write_run(tmp_path / "runs" / "b", seed=1)
    write_voc(tmp_path / "voc" / "a_24k", a, [(82.0, 57.0, 63.0), (82.2, 57.2, 63.4)], requested=2)
    write_voc(tmp_path / "voc" / "a_12k", a, [(80.0, 54.0, 60.0), (80.4, 54.2, 60.2)], requested=2,
              opts=("SOLVER.MAX_ITER", "12000"), config_sha256="0a" * 32)
    write_voc(tmp_path / "voc" / "b_other", b, [(70.0, 45.0, 48.0)], requested=1,
              config="/configs/voc_R_50_FPN_moco.yaml", config_sha256="fb" * 32)
    report = build_report([tmp_path])
    headers, rows = parse(report.markdown)
    ap50 = [h for h in headers if h.startswith("VOC AP50")]
    assert ap50 == ["VOC AP50 (c4-24k, opts SOLVER.MAX_ITER 12000, config sha256 0a0a0a0a0a0a)",
                    "VOC AP50 (c4-24k, opts none, config sha256 c0ffeec0ffee)",
                    "VOC AP50 (voc_R_50_FPN_moco.yaml, opts none, config sha256 fbfbfbfbfbfb)"]
    short, full, fpn = ap50
    ra, rb = row_of(rows, "runs/a/"), row_of(rows, "runs/b/")
    assert (ra[full], ra[short], ra[fpn]) == ("82.1 ± 0.1 (n=2)", "80.2 ± 0.3 (n=2)", "–")
    assert (rb[full], rb[short], rb[fpn]) == ("–", "–", "70.0")
    assert sum(h.startswith("VOC AP (") for h in headers) == sum(h.startswith("VOC AP75") for h in headers) == 3
    assert "Pooled cells" not in report.markdown and "pooled" not in ra[full]
    assert "- **VOC AP (c4-24k, opts SOLVER.MAX_ITER 12000, config sha256 0a0a0a0a0a0a)**: " \
           "`moco eval voc`, VOC07 test box AP (%) after fine-tuning; config c4-24k, " \
           "opts SOLVER.MAX_ITER 12000, config sha256 0a0a0a0a0a0a" in report.markdown


def test_two_evaluations_of_one_checkpoint_are_pooled_and_the_table_says_so(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # folders show relative to the working directory
    a = write_run(tmp_path / "runs" / "a", seed=0, **V2)
    b = write_run(tmp_path / "runs" / "b", seed=1, **V2)
    first = [(82.0, 57.0, 63.0), (82.4, 57.4, 63.4)]
    again = [(81.0, 56.0, 62.0), (81.2, 56.2, 62.2), (81.4, 56.4, 62.4)]
    write_voc(tmp_path / "voc" / "a", a, first, requested=2)
    write_voc(tmp_path / "voc" / "a_again", a, again, requested=3)  # the same config, opts and target
    write_voc(tmp_path / "voc" / "b", b, first, requested=2)
    write_linear(tmp_path / "lin" / "a", a, 70.0)
    write_linear(tmp_path / "lin" / "a_rerun", a, 71.0)  # the old silent "± (n=2)" cell
    report = build_report([tmp_path / "runs", tmp_path / "voc", tmp_path / "lin"])
    _, rows = parse(report.markdown)
    ra, rb = row_of(rows, "runs/a/"), row_of(rows, "runs/b/")
    ap50 = [t[0] for t in first + again]
    assert ra["VOC AP50"] == f"{statistics.fmean(ap50):.1f} ± {statistics.stdev(ap50):.1f} (n=5, pooled)"
    assert ra["linear top-1"] == "70.5 ± 0.7 (n=2, pooled)"
    assert rb["VOC AP50"] == "82.2 ± 0.3 (n=2)" and rb["linear top-1"] == "–"  # one evaluation: not pooled
    notes = report.markdown.split("Pooled cells", 1)[1].split("\n\n", 1)[0].splitlines()
    assert notes[0] == " (one checkpoint evaluated more than once under one protocol; mean ± std and n are over " \
                       "all their values):"
    ckpt = "runs/a/checkpoint_0007.pth.tar"
    for family in ("VOC AP50", "VOC AP", "VOC AP75"):
        assert f"- {ckpt}, **{family}**: 2 evaluations pooled: voc/a (n=2), voc/a_again (n=3)" in notes
    assert f"- {ckpt}, **linear top-1**: 2 evaluations pooled: lin/a (n=1), lin/a_rerun (n=1)" in notes
    assert len(notes) == 5
    assert "pooled: the cell merges several evaluations of one checkpoint" in report.markdown

    # pooled per recipe: the recipe's cell is over checkpoints, and the note names the checkpoint that pooled
    report = build_report([tmp_path / "runs", tmp_path / "voc", tmp_path / "lin"], group_by="recipe")
    _, rows = parse(report.markdown)
    assert rows[0]["linear top-1"] == "70.5 (n=1 of 2, pooled)"
    assert f"- digits (seeds 0, 1), **linear top-1**: checkpoint {ckpt}: 2 evaluations pooled: lin/a (n=1), " \
           "lin/a_rerun (n=1)" in report.markdown
    assert "each pooled checkpoint's value is the mean over all its evaluations' values" in report.markdown


def test_intermediate_checkpoint_and_recipe_from_the_checkpoint_itself(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ck.pth.tar")
    state = torch.load(ckpt, weights_only=True)
    state["epoch"] = 4
    state["config"].update(mlp=True, aug_plus=False, cos=True, moco_t=0.2, epochs=8, batch_size=32)
    torch.save(state, ckpt)
    write_knn(tmp_path / "k", ckpt, {200: 50.0})
    _, rows = parse(build_report([tmp_path / "k"]).markdown)  # no run folder: the checkpoint's config entry
    assert (rows[0]["MLP"], rows[0]["aug+"], rows[0]["epochs"], rows[0]["batch"]) == ("✓", "", "4/8", "32")
    ckpt.write_bytes(b"replaced")  # a file that changed since the evaluation is not trusted for the recipe
    _, rows = parse(build_report([tmp_path / "k"]).markdown)
    assert rows[0]["MLP"] == "–" and rows[0]["kNN top-1"] == "50.0"


def test_format_cell() -> None:
    assert format_cell(None) == "–" and format_cell(Cell([])) == "–"
    assert format_cell(Cell([57.04])) == "57.0"
    assert format_cell(Cell([56.8, 57.0, 57.2])) == "57.0 ± 0.2 (n=3)"
    assert format_cell(Cell([57.0], requested=5)) == "57.0 (n=1 of 5)"
    assert format_cell(Cell([1.234, 1.236]), decimals=3) == "1.235 ± 0.001 (n=2)"


def test_cli_end_to_end_writes_markdown_and_png(tmp_path: Path) -> None:
    a = write_run(tmp_path / "runs" / "a", knn=70.0, random_init=40.0)
    write_linear(tmp_path / "runs" / "a_linear", a, 80.0)
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "knn.json").write_text("{not json")
    out = tmp_path / "docs" / "table.md"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--output", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    assert out.read_text() == result.stdout
    _, rows = parse(result.stdout)
    assert row_of(rows, "runs/a/checkpoint_0007")["linear top-1"] == "80.0"
    assert "broken/knn.json: not readable JSON" in result.stderr and "Skipped (unusable)" in out.read_text()
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size[0] >= 600
    assert not list(out.parent.glob(".*.tmp"))


def test_no_results_is_a_clear_error_naming_the_paths(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(ReportError, match="no results found in .*empty, .*other"):
        build_report([tmp_path / "empty", tmp_path / "other"])
    result = CliRunner().invoke(main, ["report", str(tmp_path / "empty"), str(tmp_path / "other")])
    assert result.exit_code == 2
    assert "no results found in" in result.output and "empty" in result.output and "linear.json" in result.output
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "nowhere" in missing.output
    with pytest.raises(ReportError, match="notes.txt: not a result file"):
        build_report([tmp_path / "other" / "notes.txt"])


def test_report_reads_what_the_evaluators_write(tmp_path: Path) -> None:
    """Real `moco eval knn` and `moco eval linear --cached` outputs of one checkpoint land in one row."""
    ckpt = make_checkpoint(tmp_path / "ck.pth.tar", image_size=16)
    data = make_image_folder(tmp_path / "data", per_class=6)
    common = ["--data", str(data), "--no-cache", "-j", "0"]
    knn = CliRunner().invoke(main, ["eval", "knn", str(ckpt), "-o", str(tmp_path / "knn"), "--k", "3", *common])
    assert knn.exit_code == 0, knn.output
    linear = CliRunner().invoke(main, ["eval", "linear", str(ckpt), "-o", str(tmp_path / "lin"), "--cached",
                                       "--epochs", "1", "--lr", "0.1", *common])
    assert linear.exit_code == 0, linear.output
    result = CliRunner().invoke(main, ["report", str(tmp_path / "knn"), str(tmp_path / "lin")])
    assert result.exit_code == 0, result.output
    headers, rows = parse(result.output)
    knn_top1 = json.loads((tmp_path / "knn" / "knn.json").read_text())["knn"]["3"]["top1"]
    lin_top1 = json.loads((tmp_path / "lin" / "linear.json").read_text())["final"]["top1"]
    assert len(rows) == 1 and rows[0]["checkpoint"].endswith("ck.pth.tar") and rows[0]["MLP"] == "✓"
    assert rows[0]["linear top-1"] == f"{lin_top1:.1f}" and rows[0]["kNN top-1"] == f"{knn_top1:.1f}"


def write_coco(folder: Path, ckpt: Path, trials: list[tuple[float, float]], requested: int,
               config: str = "fpn-1x") -> None:
    """A `moco eval coco` run folder through the real bookkeeping: box AP and mask AP per trial (the other metrics
    follow from them), metrics.json per trial in COCO's layout, summary.json and run.json naming the benchmark."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"version": 2, "benchmark": "coco", "config": {},
                                                 "checkpoint_sha256": sha256_file(ckpt), "config_sha256": "c0c0" * 16}))
    for k, (box, mask) in enumerate(trials):
        result = {task: {"AP": ap, "AP50": ap + 20, "AP75": ap + 3, "APs": ap - 15, "APm": ap, "APl": float("nan")}
                  for task, ap in (("bbox", box), ("segm", mask))}
        write_metrics(trial_dir(folder, k), COCO.record(result), seed=k, benchmark=COCO)
    summarize(folder, requested, {"checkpoint": "relative/ck.pth.tar", "weights": "w.pkl", "config": config,
                                  "opts": []}, COCO)


def test_coco_runs_give_box_and_mask_columns(tmp_path: Path) -> None:
    """`moco eval coco` folders land in the row of their checkpoint, next to its VOC result, as box and mask
    AP/AP50/AP75 columns; a table without COCO results has no COCO columns."""
    a = write_run(tmp_path / "runs" / "a", seed=0)
    b = write_run(tmp_path / "runs" / "b", seed=1)
    write_voc(tmp_path / "voc" / "a", a, [(82.0, 57.0, 63.0)], requested=1)
    write_coco(tmp_path / "coco" / "a", a, [(40.1, 36.2), (40.5, 36.4)], requested=2)
    write_coco(tmp_path / "coco" / "b", b, [(38.0, 34.0)], requested=2)
    report = build_report([tmp_path])
    headers, rows = parse(report.markdown)
    coco = [h for h in headers if h.startswith("COCO")]
    assert coco == ["COCO box AP", "COCO box AP50", "COCO box AP75", "COCO mask AP", "COCO mask AP50",
                    "COCO mask AP75"]
    assert headers.index("VOC AP75") < headers.index("COCO box AP")
    ra, rb = row_of(rows, "runs/a/"), row_of(rows, "runs/b/")
    assert ra["COCO box AP"] == "40.3 ± 0.3 (n=2)" and ra["COCO mask AP"] == "36.3 ± 0.1 (n=2)"
    assert ra["COCO box AP50"] == "60.3 ± 0.3 (n=2)" and ra["COCO mask AP75"] == "39.3 ± 0.1 (n=2)"
    assert ra["VOC AP50"] == "82.0"  # the same checkpoint's VOC result, in the same row
    assert rb["COCO box AP"] == "38.0 (n=1 of 2)" and rb["VOC AP"] == "–"
    assert "- **COCO mask AP**: `moco eval coco`, COCO val2017 box or mask AP (%) of Mask R-CNN after " \
           "fine-tuning; config fpn-1x, opts none, config sha256 c0c0c0c0c0c0" in report.markdown
    headers, _ = parse(build_report([tmp_path / "runs", tmp_path / "voc"]).markdown)
    assert not [h for h in headers if h.startswith("COCO")]


def test_results_of_a_replaced_checkpoint_are_stale_not_credited_to_the_new_recipe(tmp_path: Path) -> None:
    """A pretraining run started again in its folder replaces checkpoint_0007 and config.yaml: the results
    computed on the old file (their recorded sha256) are not the new file's, nor of the new recipe, nor pooled
    with it by --group-by recipe; they stand on a row of their own that says why."""
    old = write_run(tmp_path / "runs" / "a", seed=0, **V1)
    write_linear(tmp_path / "lin" / "a_old", old, 60.0)
    write_voc(tmp_path / "voc" / "a_old", old, [(80.0, 55.0, 60.0)], requested=1)
    new = write_run(tmp_path / "runs" / "a", seed=0, **V2)  # the same path, another recipe
    assert new == old
    write_linear(tmp_path / "lin" / "a_new", new, 70.0)
    other = write_run(tmp_path / "runs" / "c", seed=1, **V2)
    write_linear(tmp_path / "lin" / "c", other, 72.0)

    report = build_report([tmp_path])
    _, rows = parse(report.markdown)
    current = [r for r in rows if r["checkpoint"].endswith("runs/a/checkpoint_0007.pth.tar")]
    stale = [r for r in rows if "(stale: sha256 " in r["checkpoint"]]
    assert len(current) == 1 and len(stale) == 1
    assert current[0]["linear top-1"] == "70.0" and current[0]["VOC AP50"] == "–" and current[0]["MLP"] == "✓"
    assert stale[0]["checkpoint"].startswith(str(tmp_path / "runs" / "a" / "checkpoint_0007.pth.tar"))
    assert stale[0]["linear top-1"] == "60.0" and stale[0]["VOC AP50"] == "80.0"
    assert stale[0]["MLP"] == "–" and stale[0]["cos"] == "–"  # neither recipe: the old one is gone, the new isn't its
    assert "Stale rows (results computed on a checkpoint whose file has since been replaced" in report.markdown

    _, rows = parse(build_report([tmp_path], group_by="recipe").markdown)
    v2 = [r for r in rows if r["recipe"].startswith("digits (seeds 0, 1)")]
    assert len(v2) == 1 and v2[0]["linear top-1"] == "71.0 ± 1.4 (n=2)" and v2[0]["VOC AP50"] == "–"
    assert [r["linear top-1"] for r in rows if "(stale: " in r["recipe"]] == ["60.0"]


def test_one_detection_protocol_is_one_column_whatever_its_config_was_called(tmp_path: Path) -> None:
    """`--config c4-24k`, the default `voc_R_50_C4_24k_moco.yaml` and a copy of it train the same target (the
    same config hash): one column, pooled, its note naming every spelling; execution --opts (workers) do not
    make a protocol either. Another hash keeps its own column."""
    a = write_run(tmp_path / "runs" / "a", seed=0)
    write_voc(tmp_path / "voc" / "file", a, [(82.0, 57.0, 63.0)], requested=1)
    write_voc(tmp_path / "voc" / "choice", a, [(82.4, 57.4, 63.4)], requested=1, config="c4-24k",
              opts=("DATALOADER.NUM_WORKERS", "8"))
    write_voc(tmp_path / "voc" / "copy", a, [(82.2, 57.2, 63.2)], requested=1, config="/cfgs/my_voc.yaml")
    report = build_report([tmp_path])
    headers, rows = parse(report.markdown)
    assert [h for h in headers if h.startswith("VOC")] == ["VOC AP50", "VOC AP", "VOC AP75"]
    assert rows[0]["VOC AP50"] == "82.2 ± 0.2 (n=3, pooled)"
    assert "- **VOC AP50**: `moco eval voc`, VOC07 test box AP (%) after fine-tuning; config c4-24k / my_voc.yaml, " \
           "opts none, config sha256 c0ffeec0ffee" in report.markdown

    write_voc(tmp_path / "voc" / "short", a, [(80.0, 54.0, 60.0)], requested=1, config="c4-24k",
              opts=("SOLVER.MAX_ITER", "12000"), config_sha256="0a" * 32)
    headers, rows = parse(build_report([tmp_path]).markdown)
    assert [h for h in headers if h.startswith("VOC AP50")] == [
        "VOC AP50 (c4-24k, opts SOLVER.MAX_ITER 12000, config sha256 0a0a0a0a0a0a)",
        "VOC AP50 (c4-24k / my_voc.yaml, opts none, config sha256 c0ffeec0ffee)"]


def test_a_trial_whose_metrics_are_not_utf8_is_skipped_not_fatal(tmp_path: Path) -> None:
    """A metrics.json with invalid UTF-8 (a disk or copy error) is a damaged trial like a torn one: the run's other
    trials are reported, as are the other folders."""
    a = write_run(tmp_path / "runs" / "a", seed=0)
    write_voc(tmp_path / "voc" / "a", a, [(82.0, 57.0, 63.0), (82.4, 57.4, 63.4)], requested=2)
    (trial_dir(tmp_path / "voc" / "a", 1) / "metrics.json").write_bytes(
        b'{"AP50": 82.4, "AP": 57.4, "AP75": 63.4, "seed": 1, "note": "\xe9\xff"}')
    (tmp_path / "runs" / "b").mkdir()
    (tmp_path / "runs" / "b" / "knn.json").write_bytes(b'{"knn": "\xff"}')
    report = build_report([tmp_path])
    _, rows = parse(report.markdown)
    assert row_of(rows, "runs/a/")["VOC AP50"] == "82.0 (n=1 of 2)"
    assert "knn.json: not readable JSON (UnicodeDecodeError" in report.markdown
