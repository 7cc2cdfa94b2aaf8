"""The VOC memory pre-flight without a GPU: the decision and messages (measurements from a memory model), the
probe's scaler warm-up, the allocation-failure classification with the real exception types, the pre-flight's
paths with a stubbed plan, and the re-probe after a training OOM in a fresh process (real subprocesses)."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch
import torch.distributed as dist

from moco_transfer.eval.detection import runner
from moco_transfer.eval.detection.memory import (
    BUSY_BYTES,
    GIB,
    HEADROOM_FRACTION,
    GpuMemory,
    MemoryPlan,
    Setting,
    TrialShape,
    allocation_failure,
    candidate_options,
    is_out_of_memory,
    memory_fraction,
    plan_memory,
    probe_image_size,
    probe_sizes,
)
from moco_transfer.eval.detection.probe import RESULT_MARK, ProbeError, warm_up
from moco_transfer.eval.detection.schedule import DIST_URL_ENV
from moco_transfer.eval.detection.trials import RunBook, TrialState, folder_states, trial_dir, write_metrics

VOC = dict(ims_per_batch=16, base_lr=0.02, steps=(18000, 22000), max_iter=24000)


class Device:
    """A GPU of `total` GiB on which a setting needs `fixed + per_image * n` GiB (fp16 activations: `amp_ratio`).

    Roughly the R50-C4 figures measured on an H100 (8 images fp32 37.6 GB, 16 images AMP 38.2 GB). A setting
    that needs more than the device holds runs out of memory in the probe (None), as on a real GPU.
    """

    def __init__(self, total_gib: float, fixed: float = 1.0, per_image: float = 4.6, amp_ratio: float = 0.51):
        self.total, self.fixed, self.per_image, self.amp_ratio = total_gib * GIB, fixed, per_image, amp_ratio
        self.calls: list[Setting] = []

    def need(self, s: Setting) -> int:
        return int((self.fixed + s.ims_per_gpu * self.per_image * (self.amp_ratio if s.amp else 1.0)) * GIB)

    def measure(self, s: Setting) -> int | None:
        self.calls.append(s)
        need = self.need(s)
        return need if need <= self.total else None


def test_probe_size_is_the_largest_padded_input():
    sizes = (480, 512, 800)
    assert probe_image_size(sizes, 1333, aspect_grouping=True) == (800, 1333)
    assert probe_image_size(sizes, 1333, aspect_grouping=False) == (1333, 1333)  # landscape + portrait pad square
    assert probe_image_size((64,), 96, True) == (64, 96)


def test_fits_with_one_probe_and_says_so():
    dev = Device(80)
    shape = TrialShape(**VOC, gpus=4)  # 4 images per GPU
    plan = plan_memory(shape, int(79 * GIB), int(80 * GIB), dev.measure, image_size=(800, 1333), device="H100")
    assert plan.fits and plan.options == []
    assert dev.calls == [Setting(4, False)]  # nothing else is probed when the setting fits
    assert plan.peak == dev.need(Setting(4, False))
    line = plan.summary_line()
    assert "4 images per GPU in fp32 needs 19.4 GiB at 800x1333 px" in line and "79.0 GiB free of 80.0" in line


def test_16_images_fp32_on_one_80gb_gpu_lists_amp_more_gpus_and_scaling_with_costs():
    dev = Device(79.6, per_image=5.0)
    shape = TrialShape(**VOC, gpus=1, visible_gpus=1)
    free, total = int(79.2 * GIB), int(79.6 * GIB)
    plan = plan_memory(shape, free, total, dev.measure, image_size=(800, 1333), device="NVIDIA H100 80GB HBM3")
    assert not plan.fits and plan.peak is None  # the probe itself ran out of memory
    assert plan.usable == free - int(HEADROOM_FRACTION * total)
    kinds = {o.kind: o for o in plan.options}
    assert list(kinds) == ["amp", "gpus", "scale"]  # scale+amp is not offered: scaling alone fits
    assert kinds["amp"].fits and kinds["amp"].setting == Setting(16, True) and kinds["amp"].resumes
    assert kinds["gpus"].flags == "--gpus 2" and kinds["gpus"].setting == Setting(8, False)
    assert kinds["scale"].flags == "--scale-to-gpus" and not kinds["scale"].resumes
    assert kinds["scale"].max_iter == 48000
    msg = plan.message()
    assert msg.startswith("memory pre-flight: the trial does not fit in GPU memory: 16 images per GPU in fp32 ran "
                          "out of memory in a probe iteration at 800x1333 px")
    assert "79.2 GiB free of 79.6 GiB on NVIDIA H100 80GB HBM3" in msg
    assert f"--amp: 16 images per GPU in fp16 (--amp), needs {dev.need(Setting(16, True)) / GIB:.1f} GiB" in msg
    assert "0.77 s/iter on one H100 80 GB -> 5.1 h per trial" in msg  # 24000 x 0.77 s
    assert "IMS_PER_BATCH: 16 -> 8, BASE_LR: 0.02 -> 0.01" in msg and "MAX_ITER: 24000 -> 48000" in msg
    assert "0.50 s/iter on one H100 80 GB -> 6.7 h per trial" in msg  # 48000 x 0.50 s
    assert "--gpus 2: 8 images per GPU in fp32" in msg and "1 visible" in msg
    assert "--fresh" in msg  # what a schedule change means for this folder's trials
    # 16 fp32 (fails), 16 amp, 8 fp32 (more GPUs), 8 fp32 again is memoised for --scale-to-gpus
    assert dev.calls == [Setting(16, False), Setting(16, True), Setting(8, False)]


def test_small_gpus_get_the_scaling_flags_that_trigger_the_rule():
    dev = Device(16)
    shape = TrialShape(**VOC, gpus=4, visible_gpus=4)  # 4 images per GPU do not fit in 16 GiB
    plan = plan_memory(shape, int(15.5 * GIB), 16 * GIB, dev.measure)
    kinds = {o.kind: o for o in plan.options}
    assert kinds["scale"].flags == "--scale-to-gpus --max-ims-per-gpu 2"  # the default cap 4 would change nothing
    assert kinds["scale"].setting == Setting(2, False) and kinds["scale"].fits
    assert kinds["gpus"].flags == "--gpus 8" and kinds["gpus"].fits
    assert kinds["amp"].fits


def test_more_gpu_option_is_the_smallest_count_that_fits():
    dev = Device(24, fixed=1.0, per_image=4.6)  # 4 images fp32 (19.4) fit in 24 GiB, 8 do not
    shape = TrialShape(**VOC, gpus=1, amp=True)  # already AMP: 16 x 2.35 GiB does not fit
    plan = plan_memory(shape, 24 * GIB, 24 * GIB, dev.measure)
    gpus = [o for o in plan.options if o.kind == "gpus"]
    assert [o.flags for o in gpus] == ["--gpus 2"]  # 8 images AMP (19.8 GiB) fits: no larger count is tried
    assert not any(o.kind == "amp" for o in plan.options)
    assert Setting(4, True) not in dev.calls


def test_more_gpu_search_goes_on_past_counts_that_do_not_fit():
    dev = Device(12, fixed=1.0, per_image=4.6)  # AMP: 8 images 19.8 GiB do not fit, 4 images 10.4 GiB do
    shape = TrialShape(**VOC, gpus=1, amp=True)
    plan = plan_memory(shape, 12 * GIB, 12 * GIB, dev.measure)
    usable = 12 * GIB - int(HEADROOM_FRACTION * 12 * GIB)
    counts = [c for c in range(2, 17) if 16 % c == 0]  # GPUs per trial that split 16 images evenly
    first_fit = next(c for c in counts if dev.need(Setting(16 // c, True)) <= usable)
    assert first_fit == 4  # the case this test is for: --gpus 2 is measured and fails first
    gpus = [o for o in plan.options if o.kind == "gpus"]
    assert [(o.flags, o.fits) for o in gpus] == [(f"--gpus {first_fit}", True)]  # the failed count is dropped
    tried = [s for s in dev.calls if s.ims_per_gpu < 16]
    assert tried[:2] == [Setting(8, True), Setting(4, True)]  # 8 images (2 GPUs) failed, so 4 (4 GPUs) were tried
    assert Setting(2, True) not in dev.calls  # nothing after the smallest count that fits
    assert "--gpus 4: 4 images per GPU in fp16 (--amp), needs 10.4 GiB" in plan.message()


def test_nothing_fits_says_so():
    dev = Device(4)
    plan = plan_memory(TrialShape(**VOC, gpus=1), 4 * GIB, 4 * GIB, dev.measure)
    assert not plan.fits and not any(o.fits for o in plan.options)
    assert "No option fits: a GPU with more memory is needed." in plan.message()


def test_training_oom_without_a_probe_lists_unmeasured_options():
    shape = TrialShape(ims_per_batch=2, base_lr=0.002, steps=(3,), max_iter=4, gpus=0)
    plan = plan_memory(shape, None, None, None, failed_at="trial 1 (seed 0), iteration 4 of 4", failed_peak=None)
    msg = plan.message()
    assert msg.startswith("trial 1 (seed 0), iteration 4 of 4: the trial does not fit in GPU memory: 2 images per "
                          "GPU in fp32 ran out of memory.")
    assert "Options (memory not measured here):" in msg
    assert "--amp: 2 images per GPU in fp16 (--amp), not measured" in msg
    assert "--scale-to-gpus --max-ims-per-gpu 1: 1 image per GPU in fp32" in msg
    assert "--gpus 2: 1 image per GPU in fp32" in msg


def test_training_oom_with_a_probe_names_what_was_in_use():
    dev = Device(80)
    shape = TrialShape(**VOC, gpus=1, amp=True)
    plan = plan_memory(shape, int(79 * GIB), int(80 * GIB), dev.measure, failed_at="trial 2 (seed 1), iteration 15 of "
                       "24000", failed_peak=int(74.7 * GIB))
    assert Setting(16, True) not in dev.calls  # known not to fit: not probed again
    assert "16 images per GPU in fp16 (--amp) ran out of memory with 74.7 GiB reserved" in plan.message()
    assert {o.kind for o in plan.options if o.fits} == {"gpus", "scale"}


def _literal(options):
    return [(o.kind, o.flags, o.setting, o.resumes, o.max_iter) for o in options]


def test_candidates_follow_the_scaling_rule_and_parallel_trials():
    # 8 GPUs: the protocol's count, so no --scale-to-gpus; 16 images split over 16 GPUs is the only larger count
    assert _literal(candidate_options(TrialShape(**VOC, gpus=8))) == [
        ("amp", "--amp", Setting(2, True), True, 24000), ("gpus", "--gpus 16", Setting(1, False), True, 24000)]
    assert _literal(candidate_options(TrialShape(**VOC, gpus=1))) == [
        ("amp", "--amp", Setting(16, True), True, 24000),
        ("gpus", "--gpus 2", Setting(8, False), True, 24000), ("gpus", "--gpus 4", Setting(4, False), True, 24000),
        ("gpus", "--gpus 8", Setting(2, False), True, 24000), ("gpus", "--gpus 16", Setting(1, False), True, 24000),
        ("scale", "--scale-to-gpus", Setting(8, False), False, 48000),
        ("scale+amp", "--scale-to-gpus --amp", Setting(8, True), False, 48000)]
    assert _literal(candidate_options(TrialShape(**VOC, gpus=4, amp=True))) == [  # 4 per GPU: the rule needs cap 2
        ("gpus", "--gpus 8", Setting(2, True), True, 24000), ("gpus", "--gpus 16", Setting(1, True), True, 24000),
        ("scale", "--scale-to-gpus --max-ims-per-gpu 2", Setting(2, True), False, 48000)]
    par = candidate_options(TrialShape(**VOC, gpus=1, parallel_trials=4, visible_gpus=4))
    gpus = next(o for o in par if o.kind == "gpus")
    assert gpus.flags == "--gpus 8 --parallel-trials 4 (or --parallel-trials 2 on the 4 visible)"


def test_probe_fits_but_headroom_rejects_and_the_plan_round_trips():
    dev = Device(80, fixed=30.0, per_image=2.9, amp_ratio=0.98)  # 16 fp32: 76.4 GiB, fp16 barely smaller
    free, total = int(79 * GIB), int(80 * GIB)
    plan = plan_memory(TrialShape(**VOC, gpus=1), free, total, dev.measure, image_size=(800, 1333))
    need, usable = dev.need(Setting(16, False)), free - int(HEADROOM_FRACTION * total)
    assert usable < need <= total  # the probe iteration ran; only the headroom says no
    assert not plan.fits and plan.peak == need and plan.usable == usable
    fits = {o.flags: o.fits for o in plan.options}
    assert fits == {"--amp": dev.need(Setting(16, True)) <= usable, "--gpus 2": True, "--scale-to-gpus": True}
    assert fits["--amp"] is False
    msg = plan.message()
    assert msg.startswith(f"memory pre-flight: the trial does not fit in GPU memory: 16 images per GPU in fp32 needs "
                          f"{need / GIB:.1f} GiB at 800x1333 px; 79.0 GiB free of 80.0 GiB on the GPU, 6% of it kept "
                          f"free, so {usable / GIB:.1f} GiB usable.")
    assert "Measured and too big: --amp (16 images per GPU in fp16 (--amp))" in msg.splitlines()
    again = MemoryPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.message() == msg


def test_every_gpu_of_the_run_is_checked_and_a_busy_one_is_named():
    total = int(79.6 * GIB)
    idle = GpuMemory("0", "NVIDIA H100 80GB HBM3", total - int(0.5 * GIB), total, int(0.5 * GIB))
    busy = GpuMemory("3", "NVIDIA H100 80GB HBM3", total - 40 * GIB, total, 40 * GIB)
    assert not idle.busy and busy.busy and busy.used > BUSY_BYTES
    dev = Device(79.6)
    shape = TrialShape(**VOC, gpus=2, visible_gpus=2)  # 8 images per GPU: 37.8 GiB, more than GPU 3 has
    plan = plan_memory(shape, None, None, dev.measure, gpus=[idle, busy], image_size=(800, 1333))
    assert (plan.free, plan.total) == (busy.free, busy.total)  # the tightest GPU decides
    assert not plan.fits and plan.usable == busy.free - int(HEADROOM_FRACTION * total)
    msg = plan.message()
    assert "on GPU 3 (NVIDIA H100 80GB HBM3), the tightest of 2" in msg.splitlines()[0]
    assert msg.splitlines()[1] == ("Busy: GPU 3 (NVIDIA H100 80GB HBM3) has 40.0 GiB of 79.6 GiB in use by other "
                                   "processes (free it, or leave that GPU out with CUDA_VISIBLE_DEVICES).")
    fitting = plan_memory(TrialShape(**VOC, gpus=4), None, None, dev.measure, gpus=[idle, busy])
    assert fitting.fits and fitting.summary_line().endswith("fits; " + busy.busy_line())
    assert MemoryPlan.from_json(json.loads(json.dumps(plan.to_json()))).gpus == [idle, busy]


def test_probe_sizes_are_the_largest_and_the_smallest_short_side():
    assert probe_sizes(range(480, 801, 32), 1333, True) == [(800, 1333), (480, 1333)]
    assert probe_sizes((64,), 96, True) == [(64, 96)]  # one training size: one probe size
    assert probe_sizes((480, 800), 1333, False) == [(1333, 1333)]  # without grouping both pad to the long side


def test_memory_fraction_from_the_environment():
    assert memory_fraction({}) is None and memory_fraction({"MOCO_GPU_MEMORY_FRACTION": "0.25"}) == 0.25
    with pytest.raises(ValueError, match="must be in"):
        memory_fraction({"MOCO_GPU_MEMORY_FRACTION": "1.5"})


# --- the probe's warm-up: a real GradScaler and SGD with momentum on the CPU ---------------------------------


def _scaled_step(model, optimizer, scaler, loss_scale):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(torch.ones(1, 1)).sum() * loss_scale
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def _linear():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def test_warm_up_runs_until_the_scaler_lets_a_real_step_through():
    """A fresh scaler (65536) skips steps whose scaled gradients overflow; the warm-up goes on until one is real."""
    loss_scale = 1e36  # gradient 1e36: finite, but x 65536 it overflows fp32 until the scale is small enough
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-37, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    skipped = math.ceil(math.log2(65536.0 * loss_scale / torch.finfo(torch.float32).max))  # halvings needed
    steps = warm_up(_scaled_step(model, optimizer, scaler, loss_scale), optimizer, scaler)
    assert skipped >= 1 and steps == skipped + 1
    assert scaler.get_scale() == 65536.0 / 2**skipped
    state = optimizer.state[model.weight]
    assert state["momentum_buffer"].item() == pytest.approx(loss_scale)  # one real step: buffer = the gradient
    assert model.weight.item() == pytest.approx(1.0 - 1e-37 * loss_scale)  # and the weight moved once


def test_warm_up_stops_when_no_step_goes_through_or_the_optimizer_holds_nothing():
    model = _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ProbeError, match="skipped all 5 warm-up steps"):
        warm_up(_scaled_step(model, optimizer, scaler, float("inf")), optimizer, scaler, limit=5)
    assert not optimizer.state
    fp32 = torch.amp.GradScaler("cpu", enabled=False)  # fp32: every step is real, but this one never steps
    with pytest.raises(ProbeError, match="no momentum state"):
        warm_up(lambda: None, optimizer, fp32)
    no_momentum = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD holds no state by design
    assert warm_up(lambda: None, no_momentum, fp32) == 1


# --- which failures mean "does not fit" ---------------------------------------------------------------------


NCCL_OOM = ("NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, unhandled cuda error (run with "
            "NCCL_DEBUG=INFO for details), NCCL version 2.20.5\nncclUnhandledCudaError: Call to CUDA function failed."
            "\nLast error:\nCuda failure 'out of memory'")


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"),
    torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some "
                           "other API call, so the stacktrace below might be incorrect."),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    dist.DistBackendError(NCCL_OOM),
], ids=["allocator", "accelerator", "cudnn", "cublas", "nccl"])
def test_allocation_failures_of_every_library_count_as_out_of_memory(exc):
    assert is_out_of_memory(exc)
    with pytest.raises(RuntimeError) as info:  # also when a wrapper re-raises it with its own text
        try:
            raise exc
        except RuntimeError as inner:
            raise RuntimeError("trial step failed") from inner
    assert is_out_of_memory(info.value)


@pytest.mark.parametrize("exc", [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"),
    dist.DistBackendError(NCCL_OOM.replace("Cuda failure 'out of memory'", "Cuda failure 1 'invalid argument'")),
    ValueError("Cuda failure 'out of memory'"),  # not an error a GPU library raises
], ids=["illegal-access", "cudnn-internal", "cublas-execution", "nccl-invalid", "not-runtime"])
def test_other_failures_are_not_out_of_memory(exc):
    assert allocation_failure(exc) is None


# --- the pre-flight's paths, with a stubbed probe -----------------------------------------------------------


def _prep(tmp_path, gpus=1, groups=(("0",),)):
    cfg = types.SimpleNamespace(SOLVER=types.SimpleNamespace(MAX_ITER=24000, CHECKPOINT_PERIOD=5000),
                                dump=lambda: "SOLVER: {}\n")
    shape = TrialShape(**VOC, gpus=gpus, visible_gpus=gpus)
    prep = runner.Prepared(cfg, tmp_path / "w.pkl", {}, [list(g) for g in groups], shape)
    options = runner.DetectionOptions(checkpoint=tmp_path / "c.pth", data_root=tmp_path / "VOC",
                                      output=tmp_path / "out", trials=2, gpus=gpus)
    options.output.mkdir()
    return prep, options


def _not_fitting():
    return plan_memory(TrialShape(**VOC, gpus=1), int(79 * GIB), int(80 * GIB), Device(80, per_image=5.0).measure)


def test_memory_preflight_paths(tmp_path, monkeypatch):
    prep, options = _prep(tmp_path)
    calls, lines = [], []
    monkeypatch.setattr(runner, "_probe_plan", lambda *a, **k: calls.append(1) or _not_fitting())
    with pytest.raises(runner.DoesNotFit) as info:
        runner.memory_preflight(prep, options, lines.append)
    assert str(info.value) == _not_fitting().message()
    monkeypatch.setattr(runner, "_probe_plan", lambda *a, **k: calls.append(1) or None)  # the probe could not run
    assert runner.memory_preflight(prep, options, lines.append) is None
    for k in range(options.trials):
        write_metrics(trial_dir(options.output, k), {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}, seed=k)
    prep.states = folder_states(options.output)  # as the pre-flight takes them, once, at start-up
    calls.clear()
    assert runner.memory_preflight(prep, options, lines.append) is None
    assert calls == [] and lines[-1] == "memory pre-flight: skipped, every trial is finished"
    options.gpus = 0
    assert runner.memory_preflight(prep, options, lines.append) is None and calls == []


def _script(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_probe_results_error_skip_and_crash(tmp_path, monkeypatch):
    """The probe process's last line decides: an error stops the pre-flight with its message; a crash continues."""
    prep, options = _prep(tmp_path, gpus=2, groups=(("3",), ("5",)))
    seen = tmp_path / "seen.json"
    error = ("import json, os, sys; open(sys.argv[1], 'w').write(json.dumps([sys.argv[2:], "
             "os.environ['CUDA_VISIBLE_DEVICES']])); print('MOCO_PROBE_RESULT ' + json.dumps({'error': "
             "'probe iteration of 8 images per GPU in fp32 failed: AcceleratorError: CUDA error: an illegal memory "
             "access was encountered'})); sys.exit(1)\n")
    monkeypatch.setattr(runner, "probe_argv", lambda cfg, root, shape, ids, *a: [
        *_script(tmp_path, "error", error), str(seen), *ids])
    with pytest.raises(runner.SetupError) as info:
        runner._probe_plan(prep, options, print)
    assert str(info.value) == ("memory pre-flight: the probe failed on GPU 3, 5: probe iteration of 8 images per GPU "
                               "in fp32 failed: AcceleratorError: CUDA error: an illegal memory access was encountered")
    assert json.loads(seen.read_text()) == [["3", "5"], "3,5"]  # every GPU of the run, each group's
    assert isinstance(info.value, runner.SETUP_ERRORS)  # reported as a message by the CLI, not a traceback
    crash = "import sys; print('Traceback (most recent call last):', file=sys.stderr); sys.exit(-11)\n"
    monkeypatch.setattr(runner, "probe_argv", lambda *a: _script(tmp_path, "crash", crash))
    lines = []
    assert runner._probe_plan(prep, options, lines.append) is None
    assert lines[-1].startswith("warning: memory probe could not run (Traceback") and "continuing" in lines[-1]
    plan = _not_fitting()
    ok = f"import sys; print('probe: ...', file=sys.stderr); print({RESULT_MARK + json.dumps(plan.to_json())!r})\n"
    monkeypatch.setattr(runner, "probe_argv", lambda *a: _script(tmp_path, "ok", ok))
    assert runner._probe_plan(prep, options, lines.append) == plan


TRIAL = """import json, os, sys, time
folder = sys.argv[1]
open(os.path.join(folder, "trial.json"), "w").write(json.dumps({"pid": os.getpid(),
    "cuda": os.environ["CUDA_VISIBLE_DEVICES"], "url": os.environ.get("DIST_URL_ENV")}))
json.dump({"rank": 0, "iteration": 14, "max_iter": 24000, "phase": "training", "reserved_bytes": 74 * 2**30,
           "free_bytes": None, "total_bytes": None, "device": "", "error": "CUDA out of memory"},
          open(os.path.join(folder, "oom_rank0.json"), "w"))
sys.exit(3)
""".replace("DIST_URL_ENV", DIST_URL_ENV)

PROBE = """import json, os, sys
trial = json.load(open(sys.argv[1]))
try:
    os.kill(trial["pid"], 0)
    alive = True
except ProcessLookupError:
    alive = False
json.dump({"pid": os.getpid(), "trial_alive": alive, "argv": sys.argv[2:]}, open(sys.argv[2], "w"))
print(sys.argv[3])
"""


def test_reprobe_after_a_training_oom_runs_in_a_fresh_process(tmp_path, monkeypatch):
    """On GPUs a trial runs in its own process; after its OOM the re-probe is another one, started once it is gone."""
    prep, options = _prep(tmp_path)
    folder = trial_dir(options.output, 0)
    folder.mkdir()
    reprobe = plan_memory(prep.shape, int(79 * GIB), int(80 * GIB), Device(80, per_image=5.0).measure,
                          failed_at="trial 1 (seed 0), iteration 15 of 24000", failed_peak=74 * GIB)
    record = tmp_path / "probe.json"
    monkeypatch.setattr(runner, "trial_argv", lambda folder, root, seed, gpus, benchmark: [
        *_script(tmp_path, "trial", TRIAL), str(folder)])
    monkeypatch.setattr(runner, "probe_argv", lambda cfg, root, shape, ids, failed_at, failed_peak, benchmark: [
        *_script(tmp_path, "probe", PROBE), str(folder / "trial.json"), str(record),
        RESULT_MARK + json.dumps(reprobe.to_json()), failed_at, str(failed_peak)])
    book = RunBook(options.output, options.trials, {}, lambda _: None)
    with pytest.raises(runner.DoesNotFit) as info:
        runner._run_sequential([(0, 0, folder, TrialState.NEW)], prep, options, book, lambda _: None)
    trial, probe = json.loads((folder / "trial.json").read_text()), json.loads(record.read_text())
    assert trial["pid"] != os.getpid() and probe["pid"] not in (os.getpid(), trial["pid"])
    assert probe["trial_alive"] is False  # the trial's process (and its CUDA memory) was gone before the probe
    assert trial["cuda"] == "0" and trial["url"].startswith("tcp://127.0.0.1:")
    assert probe["argv"][-2:] == ["trial 1 (seed 0), iteration 15 of 24000", str(74 * GIB)]
    assert str(info.value).startswith(reprobe.message())
    assert not torch.cuda.is_initialized()  # this process never touched CUDA


@pytest.mark.parametrize("ims,amp,text", [(1, False, "1 image per GPU in fp32"), (8, True, "8 images per GPU in fp16")])
def test_setting_wording(ims, amp, text):
    assert Setting(ims, amp).describe().startswith(text)


def test_each_trial_starts_its_own_peak_and_takes_the_memory_cap(monkeypatch):
    """start_memory_stats (run_trial's first step) on a CUDA process: peak reset, cap on its own device only."""
    from moco_transfer.eval.detection import train

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append(("reset", *a)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append(("cap", f, d)))
    train.start_memory_stats()
    assert calls == [("reset",)]
    monkeypatch.setenv("MOCO_GPU_MEMORY_FRACTION", "0.5")
    calls.clear()
    train.start_memory_stats()
    assert calls == [("cap", 0.5, 3), ("reset",)]  # not on the other 7 devices: that would open contexts there
