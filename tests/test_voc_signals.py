"""`moco eval voc` on SIGTERM/SIGUSR1: trials save a detectron2 checkpoint, the run exits 75, the same command resumes.

The runner's handling of exit code 75 and the forwarding of a signal to trial processes run without detectron2,
with stand-in trial processes; the end-to-end test (a real `moco eval voc` process on the synthetic VOC tree,
SIGTERM while it trains, then the same command again) needs detectron2 and skips without it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from moco_transfer.eval.detection import runner
from moco_transfer.eval.detection.schedule import PoolJob, run_pool, trial_stopped, wait_forwarding
from moco_transfer.eval.detection.trials import STOPPED_FILE
from moco_transfer.signals import EXIT_STOPPED, StopRequest

from .voc_synthetic import TINY, single_torch_thread, write_moco_checkpoint, write_voc  # noqa: F401

# A stand-in trial: marks itself ready, then on SIGTERM writes stopped.json as detection.train does and exits 75.
STAND_IN = '''
import json, pathlib, signal, sys, time
folder = pathlib.Path(sys.argv[1])
folder.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):
    (folder / "stopped.json").write_text(json.dumps({"iteration": 7, "max_iter": 30, "signal": "SIGTERM",
                                                     "checkpoint": "model_0000006.pth"}))
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
(folder / "ready").write_text("")
time.sleep(60)
'''


def _signal_self_when(paths: list[Path], sig: int = signal.SIGTERM) -> threading.Thread:
    """Send `sig` to this process (a user's kill of the runner) once every path exists."""
    def wait() -> None:
        deadline = time.monotonic() + 60
        while not all(p.exists() for p in paths) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    return t


def test_pool_forwards_the_stop_and_starts_no_further_trial(tmp_path):
    jobs = [PoolJob(k, [sys.executable, "-c", STAND_IN, str(tmp_path / f"t{k}")], tmp_path / f"t{k}.log")
            for k in range(3)]
    started, exits = [], []

    def on_exit(job, code):
        exits.append((job.key, code))
        return code == 0

    with StopRequest() as stop:
        t = _signal_self_when([tmp_path / "t0" / "ready", tmp_path / "t1" / "ready"])
        codes = run_pool(jobs, [[], []], lambda group: dict(os.environ),
                         lambda job, group: started.append(job.key), on_exit, tick_s=0.2, stop=stop)
        t.join()
    assert stop.signal_name == "SIGTERM"
    assert codes == {0: EXIT_STOPPED, 1: EXIT_STOPPED} and sorted(exits) == [(0, 75), (1, 75)]
    assert started == [0, 1] and not (tmp_path / "t2").exists()  # the third trial never started
    assert all((tmp_path / f"t{k}" / "stopped.json").is_file() for k in (0, 1))


def test_wait_forwarding_and_what_counts_as_stopped(tmp_path):
    with StopRequest() as stop:
        proc = subprocess.Popen([sys.executable, "-c", STAND_IN, str(tmp_path / "t")])
        t = _signal_self_when([tmp_path / "t" / "ready"], signal.SIGUSR1)
        assert wait_forwarding(proc, stop, poll_s=0.05) == EXIT_STOPPED
        t.join()
    assert stop.signal_name == "SIGUSR1"
    assert trial_stopped(EXIT_STOPPED, None)
    assert trial_stopped(-signal.SIGTERM, stop)  # killed before its handler, while this run was stopping
    assert not trial_stopped(-signal.SIGTERM, StopRequest())  # killed by someone else: a failure
    assert not trial_stopped(1, stop) and not trial_stopped(0, None)


class _Book:
    def __init__(self) -> None:
        self.started_keys: list[int] = []

    def started(self, k: int) -> None:
        self.started_keys.append(k)

    def finished(self, k: int) -> None:
        return None


@pytest.mark.parametrize("parallel", [1, 2])
def test_runner_stops_on_a_trial_that_exits_75(tmp_path, monkeypatch, parallel):
    """Sequential (GPU path: subprocess per trial) and parallel: a signal to the runner reaches the trials, they
    exit 75, no further trial starts and the error names the stopped trials and says how to resume."""
    out = tmp_path / "run"
    monkeypatch.setattr(runner, "trial_argv", lambda folder, root, seed, gpus, benchmark: [
        sys.executable, "-c", STAND_IN, str(folder)])
    options = runner.DetectionOptions(checkpoint=tmp_path / "c.pth", data_root=tmp_path, output=out, trials=3,
                                      gpus=parallel, parallel_trials=parallel)
    todo = [(k, k, out / f"trial_{k}", runner.TrialState.NEW) for k in range(3)]
    prep = SimpleNamespace(groups=[[str(i)] for i in range(parallel)])
    book = _Book()
    book.plan = [(k, 30) for k in range(3)]
    run = runner._run_sequential if parallel == 1 else runner._run_parallel
    with StopRequest() as stop:
        t = _signal_self_when([out / f"trial_{k}" / "ready" for k in range(parallel)])
        with pytest.raises(runner.RunStopped) as err:
            run(todo, prep, options, book, lambda line: None, stop)
        t.join()
    assert err.value.exit_code == EXIT_STOPPED
    msg = str(err.value)
    for k in range(parallel):
        assert (f"trial {k + 1}/3 (seed {k}) stopped by SIGTERM after iteration 7 of 30 (checkpoint "
                f"{out / f'trial_{k}' / 'model_0000006.pth'})") in msg
    assert msg.endswith("run the same command again to resume.")
    assert book.started_keys == list(range(parallel)) and not (out / "trial_2").exists()


def test_cli_exits_75_with_the_message(tmp_path, monkeypatch):
    def stopped(options, echo):
        raise runner.RunStopped("trial 1/5 (seed 0) stopped by SIGTERM; run the same command again to resume.")

    monkeypatch.setattr(runner, "run_detection", stopped)
    from moco_transfer.cli import main

    res = CliRunner().invoke(main, ["eval", "voc", str(tmp_path / "c.pth"), "--voc-root", str(tmp_path)])
    assert res.exit_code == EXIT_STOPPED
    assert "stopped by SIGTERM; run the same command again to resume." in res.output


def _agree_rank(rank: int, url: str, out: str) -> None:
    import torch.distributed as dist

    from moco_transfer.distributed import agree  # what the trial's StopHook asks, with the backend's device

    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=2)
    votes = [agree([rank == 1])[0], agree([False])[0], agree([True])[0]]
    Path(out, f"rank{rank}.json").write_text(json.dumps(votes))
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_only_one_of_them_received(tmp_path):
    import torch.multiprocessing as mp

    from moco_transfer.eval.detection.schedule import PortBook

    mp.start_processes(_agree_rank, args=(PortBook().take(0), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [True, False, True]


# --- end to end with detectron2 ---------------------------------------------------------------------------------

# 10 iterations (about 1.5 s each here) and no periodic checkpoint: the only one is the stop's
LONGER = [*TINY, "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(8,)", "SOLVER.CHECKPOINT_PERIOD", "1000"]


def _moco_eval_voc(args: list[str], log: Path, on_start=None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moco_transfer.cli", "eval", "voc", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env)
        if on_start is not None:
            on_start(proc)
        return proc.wait(timeout=900)


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(moco_checkpoint, voc_root, tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")
    out = tmp_path / "run"
    trial = out / "trial_0"
    args = [str(moco_checkpoint), "--voc-root", str(voc_root), "--output", str(out), "--trials", "2", "--gpus", "0",
            "--opts", *LONGER]

    def kill_while_training(proc: subprocess.Popen, folder: Path = trial) -> None:
        deadline = time.monotonic() + 600
        while not (folder / "segments.json").exists():  # written just before the first iteration
            assert proc.poll() is None and time.monotonic() < deadline, "the trial ended before training"
            time.sleep(0.1)
        time.sleep(2)  # an iteration or two; the stop lands after the one in progress
        proc.send_signal(signal.SIGTERM)

    code = _moco_eval_voc(args, tmp_path / "log1", kill_while_training)
    text = (tmp_path / "log1").read_text()
    assert code == EXIT_STOPPED, text
    stopped = json.loads((trial / STOPPED_FILE).read_text())
    done = stopped["iteration"]  # iterations finished; the checkpoint holds detectron2's index done - 1
    assert 1 <= done < 10 and stopped["signal"] == "SIGTERM"
    name = f"model_{done - 1:07d}.pth"
    assert (trial / "last_checkpoint").read_text().strip() == name and (trial / name).is_file()
    import torch

    assert torch.load(trial / name, map_location="cpu", weights_only=False)["iteration"] == done - 1
    assert f"trial 1/2 (seed 0) stopped by SIGTERM after iteration {done} of 10 (checkpoint {trial / name})" in text
    assert "run the same command again to resume" in text and "Traceback" not in text
    assert not (trial / "metrics.json").exists()
    assert not (out / "trial_1" / "segments.json").exists()  # trial 2 never started (its folder is prepared)
    assert json.loads((out / "summary.json").read_text())["trials_finished"] == 0

    # The trial process of the GPU path (`detection.train`), signalled itself, on the prepared second trial: exit 75.
    second = out / "trial_1"
    with open(tmp_path / "log_t1", "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moco_transfer.eval.detection.train",
                                 str(second / "config.yaml"), str(voc_root), "1", "--gpus", "0"], stdout=f,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
        kill_while_training(proc, second)
        assert proc.wait(timeout=600) == EXIT_STOPPED, (tmp_path / "log_t1").read_text()
    done1 = json.loads((second / STOPPED_FILE).read_text())["iteration"]
    assert (second / "last_checkpoint").read_text().strip() == f"model_{done1 - 1:07d}.pth"
    assert "detection.train: stopped by SIGTERM after iteration" in (tmp_path / "log_t1").read_text()

    code = _moco_eval_voc(args, tmp_path / "log2")  # the same command
    text = (tmp_path / "log2").read_text()
    assert code == 0, text
    assert "trial 1/2 (seed 0): resuming from its last checkpoint" in text
    assert "trial 2/2 (seed 1): resuming from its last checkpoint" in text
    assert json.loads((out / "summary.json").read_text())["trials_finished"] == 2
    for t, d in ((trial, done), (second, done1)):
        metrics = json.loads((t / "metrics.json").read_text())
        assert metrics["start_iter"] == d and (t / "model_final.pth").is_file()
        assert [s["start_iter"] for s in json.loads((t / "segments.json").read_text())] == [0, d]
        assert f"Starting training from iteration {d}" in (t / "log.txt").read_text()
        assert not (t / STOPPED_FILE).exists()


def _group_gone(pgid: int, within_s: float = 10.0) -> bool:
    """True once no process of the group is left (workers included)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_the_whole_process_group_with_loader_workers(moco_checkpoint, voc_root, tmp_path):
    """What Slurm, torchrun's agent and GNU timeout do: SIGTERM to every process of the job, the loader workers
    included. Workers that die of it make the trial fail ("DataLoader worker (pid N) is killed by signal") instead
    of saving; shielded, they outlive it, the trial saves its checkpoint, the run exits 75, no process of the group
    is left behind, and the same command resumes and finishes from that checkpoint."""
    pytest.importorskip("detectron2", reason="detectron2 not installed (build it from source as docs/voc.md says)")
    out = tmp_path / "run"
    trial = out / "trial_0"
    args = [str(moco_checkpoint), "--voc-root", str(voc_root), "--output", str(out), "--trials", "1", "--gpus", "0",
            "--opts", *LONGER, "DATALOADER.NUM_WORKERS", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log1"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moco_transfer.cli", "eval", "voc", *args], stdout=f,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)  # its own group
        try:
            deadline = time.monotonic() + 300
            while not (trial / "segments.json").exists():  # written just before the first iteration
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            time.sleep(2)  # an iteration or two, the workers busy
            os.killpg(proc.pid, signal.SIGTERM)  # the job's signal: every process of the group
            code = proc.wait(timeout=120)  # a hang (a worker or the stop waiting forever) fails here
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "killed by signal" not in text and "Traceback" not in text, text
    assert code == EXIT_STOPPED, text
    assert _group_gone(proc.pid), "processes of the stopped run's group are still alive (loader workers?)"
    stopped = json.loads((trial / STOPPED_FILE).read_text())
    done = stopped["iteration"]
    assert 1 <= done < 10 and stopped["signal"] == "SIGTERM"
    name = f"model_{done - 1:07d}.pth"
    assert (trial / "last_checkpoint").read_text().strip() == name and (trial / name).is_file()
    assert f"trial 1/1 (seed 0) stopped by SIGTERM after iteration {done} of 10" in text
    assert not (trial / "metrics.json").exists()

    code = _moco_eval_voc(args, tmp_path / "log2")  # the same command, with its workers
    text = (tmp_path / "log2").read_text()
    assert code == 0, text
    assert "trial 1/1 (seed 0): resuming from its last checkpoint" in text
    metrics = json.loads((trial / "metrics.json").read_text())
    assert metrics["start_iter"] == done and (trial / "model_final.pth").is_file()
    assert [s["start_iter"] for s in json.loads((trial / "segments.json").read_text())] == [0, done]
    assert f"Starting training from iteration {done}" in (trial / "log.txt").read_text()
    assert not (trial / STOPPED_FILE).exists()
