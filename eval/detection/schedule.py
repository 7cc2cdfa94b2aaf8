"""Running detection trials side by side: GPU groups, the subprocess pool, remaining iterations, projected time.

No detectron2. With G GPUs and `--parallel-trials P`, the GPUs are cut into P equal groups and each group runs
one trial at a time as its own subprocess (its own CUDA_VISIBLE_DEVICES), taking the next unfinished trial when
its trial ends. The parent process never trains here; it starts, watches and books.
"""

from __future__ import annotations

import heapq
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from moco_transfer.signals import EXIT_STOPPED, StopRequest

STOP_DEATHS = (-signal.SIGTERM, -signal.SIGUSR1)  # return codes of a trial the signal ended before its handler
CHECKPOINT_NAME = re.compile(r"model_(\d+)\.pth")
# How a trial process (`detection.train`) gets its rendezvous address from the parent that chose it.
DIST_URL_ENV = "MOCO_TRIAL_DIST_URL"


def visible_devices(env: Mapping[str, str], device_count: int) -> list[str]:
    """The CUDA device ids this process can hand to children: its CUDA_VISIBLE_DEVICES entries, else 0..n-1.

    Entries are kept as written (indices, GPU-... or MIG-... UUIDs), so a child sees exactly the devices the
    user gave this process.
    """
    given = env.get("CUDA_VISIBLE_DEVICES")
    if given is None or not given.strip():
        return [str(i) for i in range(device_count)]
    return [d.strip() for d in given.split(",") if d.strip()][:device_count]


def gpu_groups(devices: Sequence[str], gpus: int, parallel: int) -> list[list[str]]:
    """The first `gpus` devices cut into `parallel` equal groups, one per concurrently running trial.

    gpus 0 means the CPU: `parallel` CPU slots with no device. Raises ValueError naming the option at fault.
    """
    if parallel < 1:
        raise ValueError(f"--parallel-trials must be at least 1, got {parallel}")
    if gpus == 0:
        return [[] for _ in range(parallel)]
    if gpus > len(devices):
        raise ValueError(f"--gpus {gpus}: only {len(devices)} CUDA device(s) visible")
    if gpus % parallel:
        raise ValueError(f"--gpus {gpus} cannot be split into --parallel-trials {parallel} equal groups "
                         f"(each trial runs on gpus / parallel-trials GPUs)")
    per = gpus // parallel
    return [list(devices[i * per:(i + 1) * per]) for i in range(parallel)]


def child_env(base: Mapping[str, str], group: Sequence[str], slots: int, cpu_count: int | None = None
              ) -> dict[str, str]:
    """Environment of a trial subprocess: its GPU group only; on CPU slots, a fair share of the cores."""
    env = dict(base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
    if not group and "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(max(1, (cpu_count or os.cpu_count() or 1) // slots))
    return env


def last_checkpoint_iteration(folder: str | os.PathLike) -> int | None:
    """Index of the last finished iteration saved in a trial folder (from detectron2's `last_checkpoint` tag).

    detectron2 names periodic checkpoints model_<iteration:07d>.pth; model_final.pth returns -1 (resolved by
    the caller against MAX_ITER). None when the folder has no checkpoint.
    """
    tag = Path(folder) / "last_checkpoint"
    try:
        name = tag.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if name == "model_final.pth":
        return -1
    m = CHECKPOINT_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def remaining_iterations(folder: str | os.PathLike, max_iter: int) -> int:
    """Training iterations a trial still has to run (all of them without a recognisable checkpoint)."""
    last = last_checkpoint_iteration(folder)
    if last is None:
        return max_iter
    if last < 0:
        return 0
    return max(0, max_iter - (last + 1))


def makespan(durations: Sequence[float], slots: int) -> float:
    """Wall time of jobs started in order, each on the first free slot (how the pool schedules trials)."""
    free = [0.0] * max(1, slots)
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        end = max(end, start + d)
        heapq.heappush(free, start + d)
    return end


def format_duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


@dataclass
class Projection:
    """Projected training time of the trials still to run, from one measured seconds-per-iteration."""

    s_per_iter: float
    iterations: list[int]  # remaining iterations of each trial still to run, in run order
    parallel: int
    trial: int  # the trial whose iterations were timed
    window: tuple[int, int]  # finished-iteration counts between which the time was taken

    @property
    def seconds(self) -> float:
        return makespan([n * self.s_per_iter for n in self.iterations], self.parallel)

    def line(self) -> str:
        n = len(self.iterations)
        total = sum(self.iterations)
        same = len(set(self.iterations)) == 1
        what = (f"{n} trial{'s' if n != 1 else ''} x {self.iterations[0]} iterations" if same
                else f"{n} trials, {total} iterations left")
        a, b = self.window[0] + 1, self.window[1]  # window counts finished iterations: [a, b) -> a+1 .. b
        timed = f"iteration {b}" if a == b else f"iterations {a}-{b}"
        return (f"projected training time: {what} x {self.s_per_iter:.3f} s/iter / {self.parallel} in parallel = "
                f"{format_duration(self.seconds)} (timed over {timed} of trial {self.trial + 1}; evaluation not "
                "included)")

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"seconds": self.seconds, "hours": self.seconds / 3600, "line": self.line()}


class PortBook:
    """Rendezvous ports for trials that run at the same time: each one distinct from those still held.

    detectron2's `launch(dist_url="auto")` asks the OS for a free port, closes it and binds it again seconds
    later in the spawned rank 0; two trials started together can be handed the same port in between
    ("Address already in use", detectron2 issue 91). Here the parent picks every running trial's port itself and
    never hands out one that a running trial holds. One GPU per trial needs no port (launch then calls the trial
    function directly), but gets one all the same, so every trial is started the same way.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.held: dict[int, int] = {}  # job key -> port

    def _free_port(self) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.host, 0))
            return int(s.getsockname()[1])

    def take(self, key: int) -> str:
        """A tcp:// URL on a port that is free now and held by no other running job; held until `release(key)`."""
        for _ in range(100):
            port = self._free_port()
            if port not in self.held.values():
                self.held[key] = port
                return f"tcp://{self.host}:{port}"
        raise RuntimeError("no free rendezvous port found in 100 tries")

    def release(self, key: int) -> None:
        self.held.pop(key, None)


def trial_stopped(code: int, stop: StopRequest | None) -> bool:
    """A trial process ended by a stop signal: exit 75 after its checkpoint, or, when this process was asked to
    stop too, killed by the signal before it installed its handler (nothing new to save then)."""
    return code == EXIT_STOPPED or (stop is not None and stop.requested and code in STOP_DEATHS)


def wait_forwarding(proc: subprocess.Popen, stop: StopRequest, poll_s: float = 0.2) -> int:
    """Wait for a trial process; once this process is asked to stop, send it SIGTERM (once) and keep waiting.

    A user's `kill` reaches only this process; the trial needs the signal to save its checkpoint, and the time to
    write it, so there is no timeout here.
    """
    forwarded = False
    while True:
        try:
            return proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if stop.requested and not forwarded:
                proc.send_signal(signal.SIGTERM)
                forwarded = True


@dataclass
class PoolJob:
    key: int  # trial index
    argv: list[str]
    log: Path  # stdout and stderr of the subprocess go here (appended: a resumed trial keeps its history)


def run_pool(jobs: Sequence[PoolJob], groups: Sequence[Sequence[str]], env_for: Callable[[Sequence[str]], dict],
             on_start: Callable[[PoolJob, Sequence[str]], dict[str, str] | None],
             on_exit: Callable[[PoolJob, int], bool], on_tick: Callable[[], None] = lambda: None,
             tick_s: float = 2.0, stop: StopRequest | None = None) -> dict[int, int]:
    """Run `jobs` in order, each as a subprocess on the first free group, at most one job per group at a time.

    `on_start(job, group)` may return environment variables for that job's process (its rendezvous address).
    `on_exit(job, returncode)` returns False to stop starting new jobs (those running still finish); `on_tick`
    runs every `tick_s` seconds while jobs run. On any exception (Ctrl-C included) the running subprocesses are
    terminated, then killed if they do not stop within 30 s. Once `stop` is requested no job starts, each running
    one gets SIGTERM once (to save its checkpoint and exit 75) and is waited for without a time limit. Returns the
    return code of every job that ran.
    """
    queue = list(jobs)
    free = list(range(len(groups)))
    running: dict[int, tuple[PoolJob, subprocess.Popen, TextIO]] = {}
    codes: dict[int, int] = {}
    go_on = True
    forwarded: set[int] = set()  # pids sent SIGTERM on the stop request
    try:
        while running or (queue and go_on):
            if stop is not None and stop.requested:
                go_on = False
                for _, proc, _ in running.values():
                    if proc.pid not in forwarded:
                        proc.send_signal(signal.SIGTERM)
                        forwarded.add(proc.pid)
            while queue and free and go_on:
                job, slot = queue.pop(0), free.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(job.log, "a")  # closed when the job ends
                extra = on_start(job, groups[slot]) or {}
                proc = subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                        env={**env_for(groups[slot]), **extra})
                running[slot] = (job, proc, log)
            deadline = time.monotonic() + tick_s
            while (running and time.monotonic() < deadline and all(p.poll() is None for _, p, _ in running.values())
                   and not (stop is not None and stop.requested
                            and any(p.pid not in forwarded for _, p, _ in running.values()))):
                time.sleep(0.1)
            for slot in [s for s, (_, p, _) in running.items() if p.poll() is not None]:
                job, proc, log = running.pop(slot)
                log.close()
                codes[job.key] = proc.returncode
                free.append(slot)
                free.sort()
                go_on = on_exit(job, proc.returncode) and go_on
            on_tick()
    finally:
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, log in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
    return codes
