"""--parallel-trials with a real detectron2 on the CPU: two trial subprocesses at once, one running out of memory.

The out-of-memory error is injected into the second trial's subprocess only, through a sitecustomize module on
its PYTHONPATH that makes detectron2's training step raise torch.OutOfMemoryError at iteration 4 of 4 (after the
checkpoint of iteration 2), as CUDA would.
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from .voc_synthetic import TINY, single_torch_thread, write_moco_checkpoint, write_voc  # noqa: F401

pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")

from moco_transfer.cli import main  # noqa: E402
from moco_transfer.eval.detection.trials import TrialState, trial_state  # noqa: E402

INJECT = '''
import sys
if "moco_transfer.eval.detection.train" in sys.orig_argv and any("trial_1" in a for a in sys.orig_argv):
    import torch
    from detectron2.engine import train_loop

    _step = train_loop.SimpleTrainer.run_step

    def run_step(self):
        if self.iter == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return _step(self)

    train_loop.SimpleTrainer.run_step = run_step
'''


def test_parallel_trials_bookkeeping_oom_and_resume(moco_checkpoint, voc_root, tmp_path, monkeypatch):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(INJECT)
    before = os.environ.get("PYTHONPATH")  # may hold detectron2's sources (docs/voc.md): the trials need it too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(inject), before])))
    out = tmp_path / "run"
    t0, t1 = out / "trial_0", out / "trial_1"
    args = [str(moco_checkpoint), "--voc-root", str(voc_root), "--output", str(out), "--trials", "2", "--gpus", "0",
            "--parallel-trials", "2", "--opts", *TINY]
    res = CliRunner().invoke(main, ["eval", "voc", *args], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    lines = res.output.splitlines()
    starts = [i for i, line in enumerate(lines) if " starting in " in line and line.endswith(".log)")]
    finished = next(i for i, line in enumerate(lines) if line.startswith("trial 1/2 (seed 0): AP50"))
    assert len(starts) == 2 and max(starts) < finished and "on CPU" in lines[starts[1]]
    # the two trials really overlapped: trial 1 began training before trial 0 finished
    assert (t1 / "segments.json").stat().st_mtime < (t0 / "metrics.json").stat().st_mtime
    assert ("trial 2 (seed 1), iteration 4 of 4: the trial does not fit in GPU memory: 2 images per GPU in fp32 "
            "ran out of memory.") in res.output
    assert f"{t1} keeps its checkpoint after iteration 2" in res.output
    assert "Traceback" not in res.output and "Traceback" not in (t1 / "console.log").read_text()
    heads = [next(line for line in (t / "console.log").read_text().splitlines() if line.startswith("detection.train: "))
             for t in (t0, t1)]
    urls = [h.split("rendezvous ")[1].split(",")[0] for h in heads]
    for t, other, head in ((t0, t1, heads[0]), (t1, t0, heads[1])):
        assert head.startswith(f"detection.train: {t} on CUDA_VISIBLE_DEVICES=, 0 GPU(s), rendezvous tcp://127.0.0.1:")
        assert str(other) not in (t / "console.log").read_text()  # each trial's log is its own
    assert urls[0] != urls[1]  # the parent handed each running trial its own port
    assert trial_state(t0) is TrialState.FINISHED and trial_state(t1) is TrialState.INTERRUPTED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_finished"] == 1 and summary["trials"][0]["trial"] == 0
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["trial_lines"]) == ["0"] and run["execution"]["parallel_trials"] == 2
    assert run["projection"]["iterations"] == [4, 4] and run["projection"]["parallel"] == 2
    assert run["projection"]["seconds"] == pytest.approx(4 * run["projection"]["s_per_iter"])  # one round of two

    # Without the injected error the interrupted trial resumes in its own subprocess; the finished one is kept.
    if before is None:
        monkeypatch.delenv("PYTHONPATH")
    else:
        monkeypatch.setenv("PYTHONPATH", before)
    metrics0 = (t0 / "metrics.json").read_text()
    res = CliRunner().invoke(main, ["eval", "voc", *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "trial 1/2 (seed 0): finished earlier" in res.output
    assert "trial 2/2 (seed 1): resuming from its last checkpoint" in res.output
    assert (t0 / "metrics.json").read_text() == metrics0
    assert json.loads((t1 / "metrics.json").read_text())["start_iter"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials_finished"] == 2 and [r["seed"] for r in summary["trials"]] == [0, 1]
    run = json.loads((out / "run.json").read_text())
    assert sorted(run["trial_lines"]) == ["0", "1"] and run["projection"]["iterations"] == [2]
