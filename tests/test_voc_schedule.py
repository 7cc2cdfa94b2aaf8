"""Parallel VOC trials without detectron2: GPU groups, the subprocess pool, remaining iterations, projections."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from moco_transfer.eval.detection.schedule import (
    DIST_URL_ENV,
    PoolJob,
    PortBook,
    Projection,
    child_env,
    format_duration,
    gpu_groups,
    last_checkpoint_iteration,
    makespan,
    remaining_iterations,
    run_pool,
    visible_devices,
)


def test_visible_devices_follow_cuda_visible_devices():
    assert visible_devices({}, 4) == ["0", "1", "2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "3,5"}, 2) == ["3", "5"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": " 2, 7,"}, 2) == ["2", "7"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "MIG-a,MIG-b"}, 1) == ["MIG-a"]  # only what CUDA accepted
    assert visible_devices({"CUDA_VISIBLE_DEVICES": ""}, 0) == []


def test_gpu_groups_split_the_run_evenly():
    devs = ["0", "1", "2", "3", "4", "5", "6", "7"]
    assert gpu_groups(devs, 8, 1) == [devs]
    assert gpu_groups(devs, 8, 4) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert gpu_groups(devs, 4, 4) == [["0"], ["1"], ["2"], ["3"]]  # the first --gpus devices only
    assert gpu_groups(["3", "5"], 2, 2) == [["3"], ["5"]]
    assert gpu_groups([], 0, 3) == [[], [], []]  # CPU slots
    with pytest.raises(ValueError, match="--gpus 6 cannot be split into --parallel-trials 4"):
        gpu_groups(devs, 6, 4)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        gpu_groups(["0", "1"], 4, 1)
    with pytest.raises(ValueError, match="--parallel-trials must be at least 1"):
        gpu_groups(devs, 8, 0)


def test_child_env_isolates_gpus_and_shares_cpu_cores():
    env = child_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, ["2", "3"], 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["PATH"] == "/bin" and "OMP_NUM_THREADS" not in env
    cpu = child_env({}, [], 2, cpu_count=16)
    assert cpu["CUDA_VISIBLE_DEVICES"] == "" and cpu["OMP_NUM_THREADS"] == "8"
    assert child_env({"OMP_NUM_THREADS": "3"}, [], 2, cpu_count=16)["OMP_NUM_THREADS"] == "3"


def test_remaining_iterations_from_the_checkpoint_tag(tmp_path):
    assert last_checkpoint_iteration(tmp_path) is None and remaining_iterations(tmp_path, 24000) == 24000
    (tmp_path / "last_checkpoint").write_text("model_0004999.pth")
    assert last_checkpoint_iteration(tmp_path) == 4999 and remaining_iterations(tmp_path, 24000) == 19000
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    assert remaining_iterations(tmp_path, 24000) == 0
    (tmp_path / "last_checkpoint").write_text("something_else.pth")
    assert remaining_iterations(tmp_path, 24000) == 24000


def test_makespan_and_projection():
    assert makespan([1.0] * 5, 1) == 5.0
    assert makespan([1.0] * 5, 2) == 3.0  # three rounds: the fifth trial runs alone
    assert makespan([1.0] * 4, 2) == 2.0
    assert makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0  # a resumed short trial leaves its slot early
    p = Projection(0.77, [24000] * 5, 1, 0, (20, 40))
    assert p.seconds == pytest.approx(24000 * 0.77 * 5)
    assert p.line().startswith("projected training time: 5 trials x 24000 iterations x 0.770 s/iter / 1 in parallel "
                               "= 25.7 h")
    assert "timed over iterations 21-40 of trial 1" in p.line()
    assert "timed over iteration 4 of trial 2" in Projection(1.0, [2], 1, 1, (3, 4)).line()
    q = Projection(0.5, [10000, 48000, 48000], 2, 1, (20, 40))
    assert q.seconds == pytest.approx(58000 * 0.5)  # 10k then 48k on one slot, 48k on the other
    assert "3 trials, 106000 iterations left" in q.line() and "8.1 h" in q.line()
    assert json.loads(json.dumps(q.to_json()))["hours"] == pytest.approx(58000 * 0.5 / 3600)
    assert format_duration(90) == "1.5 min" and format_duration(7) == "7 s"


def _job(tmp_path, key, seconds, code=0):
    script = (f"import json,os,sys,time; t=time.time(); time.sleep({seconds}); "
              f"open(r'{tmp_path}/job{key}.json','w').write(json.dumps([t,time.time(),"
              f"os.environ['CUDA_VISIBLE_DEVICES']])); print('job {key} done'); sys.exit({code})")
    return PoolJob(key, [sys.executable, "-c", script], tmp_path / f"job{key}.log")


def _spans(tmp_path, keys):
    return {k: json.loads((tmp_path / f"job{k}.json").read_text()) for k in keys}


def test_pool_runs_jobs_side_by_side_on_their_groups(tmp_path):
    started, ended, ticks = [], [], []
    jobs = [_job(tmp_path, k, 1.0) for k in range(3)]
    t0 = time.time()
    codes = run_pool(jobs, [["0"], ["1"]], lambda g: child_env({}, g, 2), lambda j, g: started.append((j.key, g)),
                     lambda j, c: ended.append((j.key, c)) or True, lambda: ticks.append(1), tick_s=0.2)
    wall = time.time() - t0
    assert codes == {0: 0, 1: 0, 2: 0}
    assert started[:2] == [(0, ["0"]), (1, ["1"])] and started[2][0] == 2
    spans = _spans(tmp_path, range(3))
    assert spans[0][2] == "0" and spans[1][2] == "1" and spans[2][2] == started[2][1][0]
    assert spans[1][0] < spans[0][1] and spans[0][0] < spans[1][1]  # jobs 0 and 1 overlapped in time
    assert spans[2][0] >= min(spans[0][1], spans[1][1])  # job 2 waited for a free group
    assert wall < 3 * 1.0 + 10  # not one after another plus start-up (3 s of sleeps, 2 slots)
    assert (tmp_path / "job2.log").read_text().strip() == "job 2 done" and ticks


def test_pool_stops_starting_jobs_after_a_failure_and_lets_running_ones_finish(tmp_path):
    jobs = [_job(tmp_path, 0, 0.1, code=3), _job(tmp_path, 1, 1.5), _job(tmp_path, 2, 0.1)]
    codes = run_pool(jobs, [[], []], lambda g: child_env({}, g, 2), lambda j, g: None, lambda j, c: c == 0,
                     tick_s=0.2)
    assert codes == {0: 3, 1: 0}  # job 1 was running and finished; job 2 never started
    assert not (tmp_path / "job2.json").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_pool_terminates_its_children_when_interrupted(tmp_path):
    pid_file = tmp_path / "job0.pid"
    script = f"import os, time; open(r'{pid_file}', 'w').write(str(os.getpid())); time.sleep(60)"
    jobs = [PoolJob(0, [sys.executable, "-c", script], tmp_path / "job0.log")]

    def stop():
        deadline = time.monotonic() + 20
        while not pid_file.exists() and time.monotonic() < deadline:  # the child is running, not just spawned
            time.sleep(0.05)
        raise KeyboardInterrupt

    t0 = time.time()
    with pytest.raises(KeyboardInterrupt):
        run_pool(jobs, [[]], lambda g: child_env({}, g, 1), lambda j, g: None, lambda j, c: True, stop, tick_s=0.2)
    pid = int(pid_file.read_text())
    try:
        assert not _alive(pid), "the pool left its child running"  # terminated and reaped by the pool
        assert time.time() - t0 < 30
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_port_book_never_hands_out_a_held_port(monkeypatch):
    book = PortBook()
    offered = iter([41000, 41000, 41000, 41001, 41000])  # what the OS says is free, one bind after another
    monkeypatch.setattr(book, "_free_port", lambda: next(offered))
    assert book.take(0) == "tcp://127.0.0.1:41000"
    assert book.take(1) == "tcp://127.0.0.1:41001"  # 41000 is free to the OS but held by trial 0: skipped
    book.release(0)
    assert book.take(2) == "tcp://127.0.0.1:41000"  # released when trial 0 ended
    real = PortBook()
    urls = {real.take(k) for k in range(4)}
    assert len(urls) == 4


def test_two_trials_started_at_once_rendezvous_on_their_own_ports(tmp_path):
    """Two trial processes of 2 ranks each (gloo on the CPU), started together by the pool with the ports the
    parent hands out: both groups form, each of its own two ranks."""
    root = Path(__file__).resolve().parents[1]
    book = PortBook()
    jobs = [PoolJob(k, [sys.executable, "-c", f"from tests.voc_synthetic import rendezvous_trial; "
                                             f"rendezvous_trial(r'{tmp_path / f'trial{k}'}')"],
                    tmp_path / f"trial{k}.log") for k in range(2)]
    started: dict[int, float] = {}

    def on_start(job, group):
        started[job.key] = time.monotonic()
        return {DIST_URL_ENV: book.take(job.key)}

    def on_exit(job, code):
        book.release(job.key)
        return True

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    codes = run_pool(jobs, [[], []], lambda g: {**env, **child_env({}, g, 2)}, on_start, on_exit, tick_s=0.2)
    logs = {k: (tmp_path / f"trial{k}.log").read_text() for k in range(2)}
    assert codes == {0: 0, 1: 0}, logs
    assert abs(started[0] - started[1]) < 1.0  # started together, not one after the other
    ranks = {k: [json.loads((tmp_path / f"trial{k}" / f"rank{r}.json").read_text()) for r in range(2)]
             for k in range(2)}
    urls = {k: {r["url"] for r in ranks[k]} for k in range(2)}
    assert all(len(u) == 1 for u in urls.values()) and urls[0] != urls[1]
    assert all(r["sum"] == 3.0 for k in range(2) for r in ranks[k])  # 1 + 2: each group has exactly its two ranks
    assert book.held == {}
