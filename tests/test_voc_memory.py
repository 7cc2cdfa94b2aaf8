"""The VOC memory pre-flight's decision and messages, without a GPU: measurements come from a memory model."""

from __future__ import annotations

import json

import pytest

from moco_transfer.eval.voc_memory import (
    GIB,
    HEADROOM_FRACTION,
    MemoryPlan,
    Setting,
    TrialShape,
    candidate_options,
    plan_memory,
    probe_image_size,
)

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


def test_candidates_follow_the_scaling_rule_and_parallel_trials():
    assert candidate_options(TrialShape(**VOC, gpus=8)) == [o for o in candidate_options(TrialShape(**VOC, gpus=8))
                                                            if o.kind in ("amp", "gpus")]  # no rule at 8 GPUs
    par = candidate_options(TrialShape(**VOC, gpus=1, parallel_trials=4, visible_gpus=4))
    gpus = next(o for o in par if o.kind == "gpus")
    assert gpus.flags == "--gpus 8 --parallel-trials 4 (or --parallel-trials 2 on the 4 visible)"


def test_plan_round_trips_through_json():
    dev = Device(80)
    plan = plan_memory(TrialShape(**VOC, gpus=1), int(79 * GIB), int(80 * GIB), dev.measure, image_size=(800, 1333))
    again = MemoryPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan and again.message() == plan.message()


@pytest.mark.parametrize("ims,amp,text", [(1, False, "1 image per GPU in fp32"), (8, True, "8 images per GPU in fp16")])
def test_setting_wording(ims, amp, text):
    assert Setting(ims, amp).describe().startswith(text)
