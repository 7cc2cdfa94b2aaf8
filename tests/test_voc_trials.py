"""VOC trial bookkeeping, dataset layout checks and the fewer-GPU rule, on real files and without detectron2."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from moco_transfer.eval.detection.gpu_scaling import scale_to_gpus
from moco_transfer.eval.detection.layouts import LayoutError, check_voc_root, our_name, voc_names
from moco_transfer.eval.detection.trials import (
    RUN_VERSION,
    Monitor,
    RunBook,
    RunMismatch,
    TrialState,
    clear_trial_records,
    fingerprint_differences,
    format_trial_line,
    inspect_run,
    mismatch_message,
    precision_of,
    read_metrics,
    read_oom,
    read_progress,
    read_run,
    summarize,
    supersede,
    trial_dir,
    trial_seed,
    trial_state,
    update_run,
    write_metrics,
)
from moco_transfer.fileio import write_json_atomic

from .voc_synthetic import write_voc


def test_trial_states_follow_files(tmp_path):
    t0 = trial_dir(tmp_path, 0)
    assert trial_state(t0) is TrialState.NEW
    t0.mkdir()
    (t0 / "last_checkpoint").write_text("model_0000001.pth")
    assert trial_state(t0) is TrialState.INTERRUPTED
    write_metrics(t0, {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}, seed=0)
    assert trial_state(t0) is TrialState.FINISHED
    (t0 / "metrics.json").write_text('{"AP": 1')  # torn write: the trial is redone, not trusted
    assert trial_state(t0) is TrialState.INTERRUPTED
    assert len({trial_seed(7, k) for k in range(5)}) == 5


def test_summary_mean_std_and_markdown(tmp_path):
    values = [(55.0, 81.0, 61.0), (56.0, 82.0, 62.0), (57.5, 82.5, 64.0)]
    for k, (ap, ap50, ap75) in enumerate(values):
        write_metrics(trial_dir(tmp_path, k), {"AP": ap, "AP50": ap50, "AP75": ap75}, seed=k, start_iter=0)
    summary = summarize(tmp_path, trials=5, info={"checkpoint": "x.pth.tar"})
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert summary["trials_finished"] == 3 and summary["trials_requested"] == 5
    assert [r["trial"] for r in summary["trials"]] == [0, 1, 2]
    assert summary["mean"]["AP"] == pytest.approx(statistics.fmean([55.0, 56.0, 57.5]))
    assert summary["std"]["AP75"] == pytest.approx(statistics.stdev([61.0, 62.0, 64.0]))
    md = (tmp_path / "summary.md").read_text()
    assert "| 1 | 1 | 56.00 | 82.00 | 62.00 | - |" in md  # precision unknown: recorded by an older version
    assert f"| mean | | {summary['mean']['AP']:.2f} |" in md
    assert "3 of 5 trials finished" in md


def test_single_trial_has_no_std_and_nan_becomes_null(tmp_path):
    write_metrics(trial_dir(tmp_path, 0), {"AP": float("nan"), "AP50": 1.0, "AP75": 0.0}, seed=0)
    summary = summarize(tmp_path, trials=1)
    assert summary["std"] == {"AP": None, "AP50": None, "AP75": None}
    assert summary["mean"]["AP"] is None and summary["mean"]["AP50"] == 1.0
    assert "null" in (tmp_path / "summary.json").read_text()
    assert read_metrics(trial_dir(tmp_path, 0))["AP"] is None


def test_metrics_must_hold_all_keys(tmp_path):
    with pytest.raises(ValueError, match="AP75"):
        write_metrics(tmp_path, {"AP": 1.0, "AP50": 2.0}, seed=0)
    assert read_metrics(tmp_path) is None


def _fp(ckpt="aa", **config):
    cfg = {"SOLVER.BASE_LR": 0.02, "SOLVER.IMS_PER_BATCH": 16, "INPUT.MIN_SIZE_TRAIN": [480, 800]} | config
    return {"version": RUN_VERSION, "checkpoint_sha256": ckpt, "config_sha256": str(sorted(cfg.items())),
            "legacy_config_sha256": "legacy", "config": cfg}


def test_run_fingerprint_names_what_differs(tmp_path):
    assert inspect_run(tmp_path, _fp()).recorded is False
    update_run(tmp_path, **_fp())
    check = inspect_run(tmp_path, _fp())
    assert check.recorded and check.same_checkpoint and check.differences == [] and not check.has_progress
    diff = fingerprint_differences(_fp(), _fp(**{"SOLVER.BASE_LR": 0.01, "SOLVER.IMS_PER_BATCH": 8}))
    assert diff == ["config: SOLVER.BASE_LR 0.02 -> 0.01, SOLVER.IMS_PER_BATCH 16 -> 8"]
    diff = fingerprint_differences(_fp(), _fp(ckpt="bb", **{"NEW.KEY": 1}))
    assert diff[0] == "checkpoint (sha256 aa -> bb)" and diff[1] == "config: NEW.KEY (absent) -> 1"
    many = fingerprint_differences(_fp(), _fp(**{f"K{i}": i for i in range(10)}), limit=3)
    assert many[0].endswith("K1 (absent) -> 1, K2 (absent) -> 2, and 7 more")
    # a record written before version 2 is compared with the legacy hash of the whole config
    legacy = {"checkpoint_sha256": "aa", "config_sha256": "legacy"}
    assert fingerprint_differences(legacy, _fp()) == []
    assert "recorded by an earlier version" in fingerprint_differences(legacy | {"config_sha256": "x"}, _fp())[0]


def test_run_mismatch_counts_the_trials_at_stake(tmp_path):
    update_run(tmp_path, **_fp())
    write_metrics(trial_dir(tmp_path, 0), {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}, seed=0)
    trial_dir(tmp_path, 1).mkdir()
    (trial_dir(tmp_path, 1) / "last_checkpoint").write_text("model_0000999.pth")
    trial_dir(tmp_path, 2).mkdir()  # no checkpoint: nothing at stake
    check = inspect_run(tmp_path, _fp(**{"SOLVER.BASE_LR": 0.01}))
    assert check.finished == [0] and check.interrupted == [1] and check.has_progress
    msg = mismatch_message(tmp_path, check)
    assert "1 finished trial(s) (0) and 1 interrupted trial(s) with a checkpoint (1)" in msg
    assert "SOLVER.BASE_LR 0.02 -> 0.01" in msg and "--fresh" in msg and "another --output" in msg
    (tmp_path / "run.json").write_text("{oops")
    with pytest.raises(RunMismatch, match="not valid JSON"):
        inspect_run(tmp_path, _fp())


def test_files_that_are_not_utf8_count_as_damaged(tmp_path):
    """Invalid UTF-8 in a trial's metrics.json (a disk or copy error) is a damaged record like a torn write: the
    pre-flight's reading of the folder goes on and the trial is redone; progress, OOM and stop records alike;
    run.json is refused with the message of an invalid one."""
    bad = b'{"AP": 50.0, "AP50": 80.0, "AP75": 55.0, "seed": 1, "note": "\xe9\xff"}'
    update_run(tmp_path, **_fp())
    write_metrics(trial_dir(tmp_path, 0), {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}, seed=0)
    t1 = trial_dir(tmp_path, 1)
    t1.mkdir()
    for name in ("metrics.json", "progress.json", "oom_rank0.json", "stopped.json"):
        (t1 / name).write_bytes(bad)
    assert read_metrics(t1) is None and trial_state(t1) is TrialState.NEW
    assert read_progress(t1) is None and read_oom(t1) is None
    (t1 / "last_checkpoint").write_text("model_0000001.pth")
    check = inspect_run(tmp_path, _fp())  # what the runner's pre-flight reads
    assert check.finished == [0] and check.interrupted == [1] and check.differences == []
    assert summarize(tmp_path, 2)["trials_finished"] == 1
    from moco_transfer.eval.detection.runner import DetectionOptions, stopped_error
    from moco_transfer.signals import StopRequest

    options = DetectionOptions(checkpoint=tmp_path / "c.pth", data_root=tmp_path, output=tmp_path, trials=2)
    assert "trial 2/2 (seed 1) stopped by a signal (resumes from" in str(stopped_error(options, [1], StopRequest()))
    (tmp_path / "run.json").write_bytes(b'{"version": 2, "note": "\xff"}')
    with pytest.raises(RunMismatch, match="not valid JSON"):
        inspect_run(tmp_path, _fp())


def test_supersede_moves_trials_and_records_only(tmp_path):
    assert supersede(tmp_path) is None
    update_run(tmp_path, **_fp())
    write_metrics(trial_dir(tmp_path, 0), {"AP": 1.0, "AP50": 2.0, "AP75": 3.0}, seed=0)
    summarize(tmp_path, 1)
    (tmp_path / "backbone_d2.pkl").write_bytes(b"weights")
    moved = supersede(tmp_path)
    assert sorted(p.name for p in moved.iterdir()) == ["run.json", "summary.json", "summary.md", "trial_0"]
    assert moved.parent == tmp_path / "superseded"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone_d2.pkl", "superseded"]
    update_run(tmp_path, **_fp())
    assert supersede(tmp_path) != moved  # a second one in the same second gets its own folder


def test_precision_of_resumed_trials_and_trial_lines():
    """precision_of's rule (its docstring, docs/voc.md): the first segment's precision, then ", then P from it. N"
    at each segment whose precision differs from the previous one (N its start iteration)."""
    assert precision_of({}) is None and precision_of({"amp": True}) == "amp" and precision_of({"amp": False}) == "fp32"
    segs = [{"start_iter": 0, "amp": False}, {"start_iter": 1200, "amp": True}, {"start_iter": 5000, "amp": True}]
    first, switch = "fp32", segs[1]  # segment 3 repeats amp: no new switch
    assert precision_of({"segments": segs}) == f"{first}, then amp from it. {switch['start_iter']}"
    assert precision_of({"segments": segs[:1]}) == "fp32"
    back = [*segs, {"start_iter": 9000, "amp": False}]
    assert precision_of({"segments": back}) == "fp32, then amp from it. 1200, then fp32 from it. 9000"
    assert precision_of({"segments": segs[1:]}) == "amp"  # one precision throughout, resumed or not
    m = {"AP": 57.0, "AP50": 82.41, "AP75": None, "seed": 3, "segments": segs[1:]}
    assert format_trial_line(3, 5, m) == "trial 4/5 (seed 3): AP50 82.41 AP 57.00 AP75 - [amp]"


def test_oom_records_and_their_cleanup(tmp_path):
    assert read_oom(tmp_path) is None
    write_json_atomic({"rank": 1, "iteration": 14}, tmp_path / "oom_rank1.json")
    write_json_atomic({"rank": 0, "iteration": 15}, tmp_path / "oom_rank0.json")
    assert read_oom(tmp_path)["rank"] == 1  # the rank that failed first
    write_json_atomic({"iteration": 3}, tmp_path / "progress.json")
    clear_trial_records(tmp_path)
    assert read_oom(tmp_path) is None and not (tmp_path / "progress.json").exists()


def test_runbook_books_trials_and_projects_once(tmp_path):
    lines = []
    update_run(tmp_path, **_fp())
    book = RunBook(tmp_path, trials=3, info={"config": "c"}, echo=lines.append, parallel=2)
    book.plan = [(0, 100), (1, 100), (2, 40)]
    book.started(0)
    book.started(1)
    book.poll()  # no progress yet
    assert book.projection is None and lines == []
    write_json_atomic({"iteration": 10, "start_iter": 0, "s_per_iter": None}, trial_dir(tmp_path, 1) / "progress.json")
    book.poll()
    assert book.projection is None
    write_json_atomic({"iteration": 40, "start_iter": 0, "s_per_iter": 0.5, "window": [20, 40]},
                      trial_dir(tmp_path, 1) / "progress.json")
    with Monitor(book, every_s=0.05):
        time.sleep(0.3)
    assert len(lines) == 1 and lines[0].startswith("projected training time: 3 trials, 240 iterations left x 0.500 "
                                                   "s/iter / 2 in parallel = 1.2 min")  # 100 | 100 then 40: 70 s
    run = read_run(tmp_path)
    assert run["projection"]["seconds"] == pytest.approx(70.0) and run["projection"]["trial"] == 1
    assert run["config_sha256"] == _fp()["config_sha256"]  # the fingerprint is kept
    assert book.finished(0) is None  # ended without metrics: nothing booked
    write_metrics(trial_dir(tmp_path, 1), {"AP": 50.0, "AP50": 80.0, "AP75": 55.0}, seed=1, amp=True)
    m = book.finished(1)
    assert m["AP50"] == 80.0
    assert lines[-1] == f"trial 2/3 (seed 1): AP50 80.00 AP 50.00 AP75 55.00 [amp] -> {tmp_path / 'summary.md'}"
    run = read_run(tmp_path)
    assert run["trial_lines"]["1"]["line"].startswith("trial 2/3 (seed 1): AP50 80.00") and run["projection"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trials_finished"] == 1 and summary["trials"][0]["precision"] == "amp"
    assert "| 1 | 1 | 50.00 | 80.00 | 55.00 | amp |" in (tmp_path / "summary.md").read_text()


def test_voc_layout_ok_and_names(tmp_path):
    write_voc(tmp_path)
    names = ["moco_voc_2007_trainval", "voc_2012_trainval", "voc_2007_test", "coco_2017_train"]
    assert voc_names(names) == ["voc_2007_trainval", "voc_2012_trainval", "voc_2007_test"]
    assert check_voc_root(tmp_path, names) == {"voc_2007_trainval": 4, "voc_2012_trainval": 2, "voc_2007_test": 4}
    assert our_name("voc_2007_test") == "moco_voc_2007_test" and our_name("coco_2017_val") == "coco_2017_val"


def test_voc_layout_errors_name_what_is_missing(tmp_path):
    write_voc(tmp_path)
    names = ["voc_2007_trainval", "voc_2012_trainval", "voc_2007_test"]
    (tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt").unlink()
    first = sorted((tmp_path / "VOC2012" / "Annotations").iterdir())[0]
    first.unlink()
    with pytest.raises(LayoutError) as info:
        check_voc_root(tmp_path, names)
    msg = str(info.value)
    assert "voc_2007_test: missing split file" in msg and "test.txt" in msg
    assert "voc_2012_trainval: 1 of 2 ids" in msg and first.stem in msg
    assert "DIR/VOC2012/Annotations/*.xml" in msg  # the expected layout is spelled out
    with pytest.raises(LayoutError, match="not a folder"):
        check_voc_root(tmp_path / "nowhere", names)


def test_scale_rule_for_fewer_gpus():
    base = dict(ims_per_batch=16, base_lr=0.02, steps=(18000, 22000), max_iter=24000)
    assert scale_to_gpus(**base, num_gpus=8) == []
    assert scale_to_gpus(**base, num_gpus=4) == []  # 4 images per GPU fit
    changes = {c.key: c.new for c in scale_to_gpus(**base, num_gpus=2)}
    assert changes == {"SOLVER.IMS_PER_BATCH": 8, "SOLVER.BASE_LR": pytest.approx(0.01),
                       "SOLVER.STEPS": (36000, 44000), "SOLVER.MAX_ITER": 48000}
    assert {c.key: c.new for c in scale_to_gpus(**base, num_gpus=0)}["SOLVER.MAX_ITER"] == 48000  # CPU = 1 device
    assert scale_to_gpus(**base, num_gpus=2, max_ims_per_gpu=8) == []  # big-memory GPUs keep 16
    assert str(scale_to_gpus(**base, num_gpus=1)[1]) == "SOLVER.BASE_LR: 0.02 -> 0.01"


def test_scale_rule_scales_warmup_and_the_periods_as_detectron2_rounds():
    """Twice the iterations of half the images: warm-up, evaluation and checkpoint periods cover as many images."""
    base = dict(ims_per_batch=16, base_lr=0.02, steps=(18000, 22000), max_iter=24000, num_gpus=1)
    changes = {c.key: (c.old, c.new) for c in scale_to_gpus(**base, warmup_iters=100, eval_period=1000,
                                                             checkpoint_period=5000)}
    assert changes["SOLVER.WARMUP_ITERS"] == (100, 200)  # 100 x 16 images = 200 x 8
    assert changes["TEST.EVAL_PERIOD"] == (1000, 2000) and changes["SOLVER.CHECKPOINT_PERIOD"] == (5000, 10000)
    assert len(changes) == 7
    off = {c.key for c in scale_to_gpus(**base, warmup_iters=100, eval_period=0, checkpoint_period=5000)}
    assert "TEST.EVAL_PERIOD" not in off  # 0 (no evaluation during training) stays 0: not a change
    # 5 images -> 2: x2.5 iterations, rounded half to even as detectron2's round(): 1 -> 2 (2.5), 3 -> 8 (7.5)
    odd = {c.key: c.new for c in scale_to_gpus(5, 0.02, (4,), 10, 1, warmup_iters=3, eval_period=1,
                                               checkpoint_period=2)}
    assert odd == {"SOLVER.IMS_PER_BATCH": 2, "SOLVER.BASE_LR": pytest.approx(0.008), "SOLVER.STEPS": (10,),
                   "SOLVER.MAX_ITER": 25, "SOLVER.WARMUP_ITERS": 8, "TEST.EVAL_PERIOD": 2,
                   "SOLVER.CHECKPOINT_PERIOD": 5}


def test_scale_to_gpus_prints_every_change_in_one_message(tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")
    from moco_transfer.eval.detection.prepare import build_config
    from moco_transfer.eval.detection.runner import DetectionOptions

    lines: list[str] = []
    cfg = build_config(DetectionOptions(checkpoint=tmp_path / "c.pth", data_root=tmp_path, gpus=1, scale_to_gpus=True),
                       echo=lines.append)
    assert lines == ["--scale-to-gpus (1 GPU(s) per trial): SOLVER.IMS_PER_BATCH: 16 -> 8; SOLVER.BASE_LR: 0.02 -> "
                     "0.01; SOLVER.STEPS: (18000, 22000) -> (36000, 44000); SOLVER.MAX_ITER: 24000 -> 48000; "
                     "SOLVER.WARMUP_ITERS: 100 -> 200; SOLVER.CHECKPOINT_PERIOD: 5000 -> 10000"]  # EVAL_PERIOD 0: off
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD) == (200, 10000, 0)


@pytest.mark.parametrize("ims, gpus", [(16, 1), (16, 2), (5, 1), (10, 2)])
def test_scale_rule_matches_detectron2_auto_scale_workers(ims, gpus):
    """An independent reference: detectron2's own rule, asked to go from `ims` to the rule's images per batch."""
    pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultTrainer

    cfg = get_cfg()
    cfg.merge_from_list(["SOLVER.IMS_PER_BATCH", ims, "SOLVER.BASE_LR", 0.02, "SOLVER.STEPS", (1801, 2203),
                         "SOLVER.MAX_ITER", 2417, "SOLVER.WARMUP_ITERS", 101, "TEST.EVAL_PERIOD", 333,
                         "SOLVER.CHECKPOINT_PERIOD", 499, "SOLVER.REFERENCE_WORLD_SIZE", ims])
    changes = scale_to_gpus(ims, 0.02, (1801, 2203), 2417, gpus, warmup_iters=101, eval_period=333,
                            checkpoint_period=499)
    new_ims = next(c.new for c in changes if c.key == "SOLVER.IMS_PER_BATCH")
    ref = DefaultTrainer.auto_scale_workers(cfg, new_ims)  # "workers" = images: one image per worker
    for c in changes:
        section, key = c.key.split(".")
        assert getattr(getattr(ref, section), key) == pytest.approx(c.new), c.key
    assert {c.key for c in changes} == {f"{sec}.{k}" for sec in ("SOLVER", "TEST") for k, v in getattr(ref, sec).items()
                                        if k != "REFERENCE_WORLD_SIZE" and v != getattr(cfg, sec)[k]}


def test_missing_detectron2_is_a_clear_error_before_anything(monkeypatch, tmp_path):
    """Where detectron2 cannot be imported, `moco eval voc` says how to install it and touches nothing."""
    import sys

    from click.testing import CliRunner

    from moco_transfer.cli import main

    monkeypatch.setitem(sys.modules, "detectron2", None)  # makes the import fail exactly as when it is absent
    ckpt = tmp_path / "c.pth.tar"
    ckpt.write_bytes(b"")
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["eval", "voc", str(ckpt), "--voc-root", str(tmp_path), "--output", str(out),
                                    "--gpus", "0"])
    assert res.exit_code == 1
    assert "detectron2 is not installed" in res.output and "pip install --no-build-isolation" in res.output
    assert not out.exists()


def test_trainer_module_is_imported_only_when_a_trial_trains():
    """The detectron2 trainer has a module of its own that imports detectron2 at its top: the CLI, the runner and
    train.py load without it (here without detectron2 at all), and run_trial imports it when it trains."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['detectron2'] = None; "
            "import moco_transfer.cli, moco_transfer.eval.detection.runner, moco_transfer.eval.detection.train; "
            "print(sorted(m for m in sys.modules if m.endswith('detection.trainer')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]
