"""Out of GPU memory with a real detectron2 on the CPU: the message, the kept checkpoint, resume rules, AMP resume.

A CPU cannot run out of GPU memory, so the error is raised the way CUDA raises it: torch.OutOfMemoryError from
the training step (detectron2's SimpleTrainer.run_step, patched for the test) at iteration 4 of 4, after the
checkpoint of iteration 2.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from .voc_synthetic import TINY, single_torch_thread, write_moco_checkpoint, write_voc  # noqa: F401

pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")

from detectron2.engine import AMPTrainer, DefaultTrainer, train_loop  # noqa: E402

from moco_transfer.cli import main  # noqa: E402
from moco_transfer.eval.detection import runner  # noqa: E402
from moco_transfer.eval.detection.layouts import register_voc  # noqa: E402
from moco_transfer.eval.detection.memory import GIB, Setting, TrialShape, plan_memory  # noqa: E402
from moco_transfer.eval.detection.prepare import build_config  # noqa: E402
from moco_transfer.eval.detection.probe import RESULT_MARK, ProbeError, Prober, image_size_of, sizes_of  # noqa: E402
from moco_transfer.eval.detection.probe import main as probe_main  # noqa: E402
from moco_transfer.eval.detection.runner import DetectionOptions  # noqa: E402
from moco_transfer.eval.detection.trainer import TrialTrainer  # noqa: E402
from moco_transfer.eval.detection.trials import TrialState, trial_state  # noqa: E402


def _run(args):
    return CliRunner().invoke(main, ["eval", "voc", *args], catch_exceptions=False)


def _tiny_cfg(voc_root, tmp_path, ckpt):
    cfg = build_config(DetectionOptions(checkpoint=ckpt, data_root=voc_root, output=tmp_path, opts=TINY, gpus=0),
                       echo=lambda _: None)
    register_voc(voc_root, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS = str(tmp_path), ""
    return cfg


def test_training_oom_is_a_message_and_the_trial_resumes(moco_checkpoint, voc_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    trial = out / "trial_0"
    args = [str(moco_checkpoint), "--voc-root", str(voc_root), "--output", str(out), "--trials", "1", "--gpus", "0"]
    original = train_loop.SimpleTrainer.run_step

    def run_step(self):
        if self.iter == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return original(self)

    monkeypatch.setattr(train_loop.SimpleTrainer, "run_step", run_step)
    res = _run([*args, "--opts", *TINY])
    assert res.exit_code == 1
    assert ("trial 1 (seed 0), iteration 4 of 4: the trial does not fit in GPU memory: 2 images per GPU in fp32 "
            "ran out of memory.") in res.output
    assert "Options (memory not measured here):" in res.output
    assert "--amp: 2 images per GPU in fp16 (--amp), not measured" in res.output
    assert "--scale-to-gpus --max-ims-per-gpu 1: 1 image per GPU in fp32" in res.output
    assert f"{trial} keeps its checkpoint after iteration 2: a re-run with --amp or more GPUs resumes it" in res.output
    assert "Traceback" not in res.output and "Exception during training" not in res.output
    oom = json.loads((trial / "oom_rank0.json").read_text())
    assert oom["iteration"] == 3 and oom["phase"] == "training" and "(simulated)" in oom["error"]
    assert trial_state(trial) is TrialState.INTERRUPTED and (trial / "last_checkpoint").read_text() == \
        "model_0000001.pth"
    log = (trial / "log.txt").read_text()
    assert "out of GPU memory in training" in log and "Traceback" in log  # the file keeps the details
    monkeypatch.undo()

    # A schedule change would orphan the interrupted trial: refused, naming the change and --fresh.
    res = _run([*args, "--opts", *TINY, "SOLVER.BASE_LR", "0.01"])
    assert res.exit_code == 1 and "1 interrupted trial(s) with a checkpoint (0)" in res.output
    assert "SOLVER.BASE_LR 0.002 -> 0.01" in res.output and trial_state(trial) is TrialState.INTERRUPTED

    # An execution setting (checkpoint period, like precision or GPU count) keeps the resume.
    res = _run([*args, "--opts", *TINY, "SOLVER.CHECKPOINT_PERIOD", "3"])
    assert res.exit_code == 0, res.output
    assert "trial 1/1 (seed 0): resuming from its last checkpoint" in res.output
    metrics = json.loads((trial / "metrics.json").read_text())
    assert metrics["start_iter"] == 2 and [s["start_iter"] for s in metrics["segments"]] == [0, 2]
    assert not (trial / "oom_rank0.json").exists()  # cleared when the trial restarted
    run = json.loads((out / "run.json").read_text())
    assert len(run["history"]) == 2  # the run that ran out of memory and this one; the refused run left none

    # --fresh takes a new schedule: the earlier trial moves to superseded/, the new one starts from iteration 0.
    res = _run([*args, "--fresh", "--opts", *TINY, "SOLVER.BASE_LR", "0.01", "SOLVER.MAX_ITER", "2"])
    assert res.exit_code == 0, res.output
    assert "--fresh: earlier trials and records moved to" in res.output
    moved = next((out / "superseded").iterdir())
    assert (moved / "trial_0" / "metrics.json").is_file() and (moved / "run.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["SOLVER.BASE_LR"] == 0.01 and len(run["history"]) == 1
    assert json.loads((trial / "metrics.json").read_text())["start_iter"] == 0


def test_fp32_checkpoint_resumes_under_amp(moco_checkpoint, voc_root, tmp_path):
    """detectron2's AMP trainer expects gradient-scaler state that an fp32 checkpoint lacks; ours starts it fresh."""
    cfg = _tiny_cfg(voc_root, tmp_path, moco_checkpoint)
    fp32 = TrialTrainer(cfg)
    fp32.iter = 1
    fp32.checkpointer.save("model_0000001")
    amp_cfg = cfg.clone()
    amp_cfg.SOLVER.AMP.ENABLED = True
    amp = TrialTrainer(amp_cfg)
    assert isinstance(amp._trainer, AMPTrainer)
    state = torch.load(tmp_path / "model_0000001.pth", weights_only=False)["trainer"]  # written by this test
    with pytest.raises(KeyError, match="grad_scaler"):
        DefaultTrainer.load_state_dict(amp, state)  # what stock detectron2 does
    amp.resume_or_load(resume=True)
    assert amp.start_iter == 2


def test_probe_iteration_runs_at_the_largest_size(moco_checkpoint, voc_root, tmp_path, capsys):
    cfg = _tiny_cfg(voc_root, tmp_path, moco_checkpoint)
    size = image_size_of(cfg)
    assert size == (64, 96)  # MIN_SIZE_TRAIN (64,), MAX_SIZE_TRAIN 96, aspect-ratio grouping on
    two = cfg.clone()
    two.INPUT.MIN_SIZE_TRAIN = (48, 64)
    assert sizes_of(two) == [(64, 96), (48, 96)]  # the largest input and the one of the smallest short side
    prober = Prober(cfg, sizes_of(cfg), device="cpu")
    before = prober.model.roi_heads.box_predictor.cls_score.weight.detach().clone()
    assert not prober.optimizer.state
    assert prober.measure(Setting(2, False)) == 0  # the CPU has no allocator statistics: warm-up and steps only
    samples = prober.samples[size]
    assert [tuple(s["image"].shape) for s in samples] == [(3, 64, 96)] * 2
    assert all(len(s["instances"]) > 0 for s in samples)  # real annotations, resized with the image
    assert not torch.equal(before, prober.model.roi_heads.box_predictor.cls_score.weight)  # a real optimizer step
    assert prober.optimizer.state  # momentum buffers exist: what training holds
    assert prober.details[-1]["warmup_steps"] == 1 and prober.details[-1]["sizes"] == [[64, 96]]

    # an allocation failure of cuBLAS means "does not fit"; an illegal memory access stops the probe
    def fail(message):
        def step(setting, size=None):
            raise RuntimeError(message)
        return step

    prober.step = fail("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert prober.measure(Setting(2, True)) is None
    assert prober.details[-1]["failed"] == "allocation failed (CUBLAS_STATUS_ALLOC_FAILED)"
    prober.step = fail("CUDA error: an illegal memory access was encountered")
    with pytest.raises(ProbeError, match="probe iteration of 2 images per GPU in fp32 failed: RuntimeError: CUDA "
                                         "error: an illegal memory access was encountered"):
        prober.measure(Setting(2, False))
    cfg_file = tmp_path / "probe.yaml"
    cfg_file.write_text(cfg.dump())
    shape = json.dumps({"ims_per_batch": 2, "base_lr": 0.002, "steps": [3], "max_iter": 4, "gpus": 0})
    assert probe_main([str(cfg_file), str(voc_root), "--shape", shape]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == RESULT_MARK + json.dumps({"skipped": "no CUDA device visible"})


def test_a_trial_that_does_not_fit_stops_before_any_trial_folder_or_run_record(moco_checkpoint, voc_root, tmp_path,
                                                                              monkeypatch):
    """On one (pretended) GPU with a probe plan that does not fit: the message, and nothing written for trials."""
    plan = plan_memory(TrialShape(2, 0.002, (3,), 4, gpus=1, visible_gpus=1), int(10 * GIB), int(12 * GIB),
                       lambda s: int((1 + 6 * s.ims_per_gpu * (0.5 if s.amp else 1)) * GIB), image_size=(64, 96))
    assert not plan.fits
    monkeypatch.setattr(runner, "visible_devices", lambda env, n: ["0"])
    monkeypatch.setattr(runner, "_probe_plan", lambda *a, **k: plan)
    out = tmp_path / "run"
    res = _run([str(moco_checkpoint), "--voc-root", str(voc_root), "--output", str(out), "--trials", "2", "--gpus",
                "1", "--opts", *TINY])
    assert res.exit_code == 1
    assert plan.message() in res.output and "Traceback" not in res.output
    assert not (out / "trial_0").exists() and not (out / "run.json").exists()
