"""The VOC memory pre-flight on a real GPU (`pytest -m cuda`, benchmarks/gpu_check.sh); skipped without CUDA or
detectron2 (its Python sources are enough: see docs/voc.md, "GPU check").

- The probe's prediction against the peak reserved memory of 40 real training iterations at the protocol's
  multi-scale sizes (480-800 px short side), on images of the largest training size, in fp32 and with --amp:
  at least the real peak, at most 15% above it.
- Under a memory cap below the need, the pre-flight refuses the trial, naming the options that fit, and no trial
  starts.
- --parallel-trials with 2 trials on one GPU: both finish, each in its own process with its own log, GPU and port.

The figures go to the session's GPU report (conftest `gpu_report`, key "voc"). About 2 minutes on one H200.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from moco_transfer.eval.detection.memory import GIB, HEADROOM_FRACTION, MEMORY_FRACTION_ENV, MemoryPlan, TrialShape

from .voc_synthetic import TINY, single_torch_thread, write_moco_checkpoint, write_voc  # noqa: F401

pytestmark = pytest.mark.cuda
pytest.importorskip("detectron2", reason="detectron2 not importable (docs/voc.md, 'GPU check': .gpu_detectron2)")

from moco_transfer.cli import main  # noqa: E402
from moco_transfer.eval.detection import runner  # noqa: E402
from moco_transfer.eval.detection.prepare import build_config  # noqa: E402
from moco_transfer.eval.detection.probe import RESULT_MARK  # noqa: E402
from moco_transfer.eval.detection.runner import DetectionOptions  # noqa: E402
from moco_transfer.eval.detection.train import start_memory_stats  # noqa: E402

ITERATIONS = 40
IMS = 4  # images per batch on the one GPU: small enough for 40 iterations in seconds, large enough to measure
# The protocol's config at a size that runs in seconds: its multi-scale training sizes and largest input, 4
# images per batch, 40 iterations, no precise BN; evaluation (4 test images) is what a trial does at the end.
RATIO_OPTS = ["SOLVER.IMS_PER_BATCH", str(IMS), "SOLVER.MAX_ITER", str(ITERATIONS), "SOLVER.STEPS", "(30,)",
              "SOLVER.WARMUP_ITERS", "10", "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.PRECISE_BN.ENABLED", "False",
              "DATALOADER.NUM_WORKERS", "4"]
PROBES: dict[bool, MemoryPlan] = {}  # amp -> the probe's plan of the ratio test's setting


@pytest.fixture(autouse=True)
def _release_this_process_cache():
    """The probe and trial processes read the GPU's free memory: blocks cached by this pytest process (other
    `cuda` tests) would count as used."""
    torch.cuda.empty_cache()
    yield


@pytest.fixture(scope="module")
def big_voc(tmp_path_factory):
    """A VOC-layout set whose images are 1333 x 800: every training size up to the largest input occurs."""
    return write_voc(tmp_path_factory.mktemp("VOCbig"), n_trainval07=12, n_test07=4, n_trainval12=4, width=1333,
                     height=800)


def _device() -> str:
    return runner.visible_devices(os.environ, torch.cuda.device_count())[0]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": _device(), **extra}


def _trial_config(voc_root, folder, opts, amp):
    cfg = build_config(DetectionOptions(checkpoint=folder / "unused.pth", data_root=voc_root, output=folder, gpus=1,
                                  amp=amp, opts=opts), echo=lambda _: None)
    cfg.OUTPUT_DIR, cfg.SEED, cfg.MODEL.WEIGHTS = str(folder), 0, ""  # random weights: memory does not care
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(cfg.dump())
    s = cfg.SOLVER
    shape = TrialShape(int(s.IMS_PER_BATCH), float(s.BASE_LR), tuple(s.STEPS), int(s.MAX_ITER), gpus=1, amp=amp,
                       visible_gpus=1)
    return cfg, shape


def _probe(cfg_file, voc_root, shape) -> tuple[MemoryPlan, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(runner.probe_argv(cfg_file, voc_root, shape, [_device()]), env=_env(), capture_output=True,
                          text=True, timeout=300)
    last = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert proc.returncode == 0 and last, proc.stderr[-3000:]
    return MemoryPlan.from_json(json.loads(last[-1][len(RESULT_MARK):])), time.perf_counter() - t0


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_probe_prediction_against_40_real_iterations(amp, big_voc, tmp_path, gpu_report):
    folder = tmp_path / "trial_0"
    cfg, shape = _trial_config(big_voc, folder, RATIO_OPTS, amp)
    plan, probe_s = _probe(folder / "config.yaml", big_voc, shape)
    PROBES[amp] = plan
    assert plan.fits, plan.message()
    measured = plan.details[0]
    assert measured["ims_per_gpu"] == IMS and measured["amp"] is amp and measured["sizes"][0] == [800, 1333]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moco_transfer.eval.detection.train", str(folder / "config.yaml"),
                           str(big_voc), "0", "--gpus", "1"], env=_env(), capture_output=True, text=True, timeout=400)
    train_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["iteration"] == ITERATIONS
    real = int(progress["peak_memory_bytes"])
    predicted = int(measured["peak_reserved"])
    ratio = predicted / real
    gpu_report.setdefault("voc", {})["amp" if amp else "fp32"] = {
        "images_per_gpu": IMS, "probe_sizes": measured["sizes"], "warmup_steps": measured["warmup_steps"],
        "predicted_reserved_gib": round(predicted / GIB, 3), "real_peak_reserved_gib": round(real / GIB, 3),
        "ratio": round(ratio, 4), "outside_allocator_gib": round(measured["outside"] / GIB, 3),
        "peaks_per_size_gib": [round(p / GIB, 3) for p in measured["peaks"]],
        "s_per_iter": progress["s_per_iter"], "probe_seconds": round(probe_s, 1), "train_seconds": round(train_s, 1),
        "gpu": torch.cuda.get_device_name(0)}
    assert real <= predicted <= 1.15 * real, f"prediction {predicted / GIB:.2f} GiB, real peak {real / GIB:.2f} GiB"


def test_a_capped_gpu_refuses_the_trial_and_names_what_fits(big_voc, moco_checkpoint, tmp_path, monkeypatch,
                                                          gpu_report):
    """8 images in fp32 under a cap that leaves room for about 1.35 x what 4 images need: --amp (8 images in fp16)
    and --scale-to-gpus (4 images) fit, the configured setting does not, and nothing starts."""
    if False not in PROBES:  # run alone: measure 4 images in fp32 first
        folder = tmp_path / "four"
        _, shape = _trial_config(big_voc, folder, RATIO_OPTS, False)
        PROBES[False] = _probe(folder / "config.yaml", big_voc, shape)[0]
    need4 = int(PROBES[False].details[0]["need"])
    free, total = torch.cuda.mem_get_info(0)
    fraction = min(1.0, (1.35 * need4 + HEADROOM_FRACTION * total) / total)
    assert fraction * total <= free, f"only {free / GIB:.1f} GiB free: the cap would not be what limits the probe"
    monkeypatch.setenv(MEMORY_FRACTION_ENV, f"{fraction:.4f}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _device())
    out = tmp_path / "run"
    opts = ["SOLVER.IMS_PER_BATCH", "8", *RATIO_OPTS[2:]]
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["eval", "voc", str(moco_checkpoint), "--voc-root", str(big_voc), "--output",
                                    str(out), "--gpus", "1", "--trials", "1", "--opts", *opts], catch_exceptions=False)
    lines = res.output.splitlines()
    gpu_report.setdefault("voc", {})["cap"] = {
        "fraction": round(fraction, 4), "need_4_fp32_gib": round(need4 / GIB, 3), "seconds": round(time.perf_counter()
                                                                                                      - t0, 1),
        "message": [line for line in lines if "does not fit" in line or line.startswith("  --")]}
    assert res.exit_code == 1, res.output
    start = next(i for i, line in enumerate(lines) if "the trial does not fit in GPU memory: 8 images per GPU in fp32"
                 in line)
    fitting = lines[lines.index("Options that fit (measured by the same probe):", start) + 1:]
    fitting = [line for line in fitting if line.startswith("  --")]
    assert any(line.startswith("  --amp: 8 images per GPU in fp16") for line in fitting), res.output
    assert any(line.startswith("  --scale-to-gpus: 4 images per GPU in fp32") for line in fitting), res.output
    assert not (out / "trial_0").exists() and not (out / "run.json").exists()


def test_two_parallel_trials_on_one_gpu(voc_root, moco_checkpoint, tmp_path, monkeypatch, gpu_report):
    """--gpus 2 --parallel-trials 2 with both groups on the one GPU (the run is told it sees it twice)."""
    dev = _device()
    monkeypatch.setattr(runner, "visible_devices", lambda env, n: [dev, dev])
    out = tmp_path / "run"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["eval", "voc", str(moco_checkpoint), "--voc-root", str(voc_root), "--output",
                                    str(out), "--gpus", "2", "--parallel-trials", "2", "--trials", "2", "--opts",
                                    *TINY], catch_exceptions=False)
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    logs = {k: (out / f"trial_{k}" / "console.log").read_text() for k in (0, 1)}
    starts = {}
    for k in (0, 1):
        mine, other = str(out / f"trial_{k}"), str(out / f"trial_{1 - k}")
        line = next(line for line in logs[k].splitlines() if line.startswith("detection.train: "))
        assert line.startswith(f"detection.train: {mine} on CUDA_VISIBLE_DEVICES={dev}, 1 GPU(s), rendezvous tcp://")
        assert other not in logs[k]  # each trial's log is its own
        starts[k] = line
        metrics = json.loads((out / f"trial_{k}" / "metrics.json").read_text())
        assert metrics["gpus"] == 1 and metrics["seed"] == k
        assert json.loads((out / f"trial_{k}" / "progress.json").read_text())["peak_memory_bytes"] > 0  # on the GPU
    ports = {k: starts[k].split("rendezvous ")[1].split(",")[0] for k in (0, 1)}
    assert ports[0] != ports[1]
    # they ran at the same time: trial 1 had started training before trial 0 finished
    assert (out / "trial_1" / "segments.json").stat().st_mtime < (out / "trial_0" / "metrics.json").stat().st_mtime
    memory = json.loads((out / "run.json").read_text())["memory"]
    assert memory["fits"] and [g["id"] for g in memory["gpus"]] == [dev]  # one GPU, read once
    gpu_report.setdefault("voc", {})["parallel"] = {"seconds": round(seconds, 1), "rendezvous": ports}


def test_peak_statistics_restart_with_each_trial():
    """A trial that runs in a process after another starts its peak from what it holds, not the earlier one's."""
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    del big
    torch.cuda.empty_cache()
    before = torch.cuda.max_memory_reserved()
    assert before >= torch.cuda.memory_reserved() + 256 * 2**20
    start_memory_stats()
    assert torch.cuda.max_memory_reserved() == torch.cuda.memory_reserved() < before

