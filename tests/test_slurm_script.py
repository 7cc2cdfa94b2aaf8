"""examples/slurm/pretrain.sbatch run here: two "nodes" of one CPU worker each, with srun and scontrol stubbed.

The stubs do what Slurm would for this script: `scontrol show hostnames` names the head node, `srun` starts
its command once per node (SLURM_NODEID 0, 1) and exits with the highest status, `scontrol requeue` is only
recorded. The torchrun line runs as written: c10d rendezvous on the head node, gloo, `--resume auto`.
SIGUSR1 goes to every process of the step, as Slurm's `--signal=USR1@180` does, and so does SIGTERM, as at the
time limit: torchrun's agents must survive it, the loader workers must keep serving, the workers must stop at one
step, save and exit 75, and the script must requeue the job.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moco_transfer.pretrain.preemption import MID_EPOCH_NAME

from .conftest import write_class_folders

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "pretrain.sbatch"

SRUN = """#!/bin/bash
# srun stub: skip the options, run the command once per node, exit with the highest status (as srun does)
while [[ $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do
    wait "$p"; s=$?
    ((s > status)) && status=$s
done
exit $status
"""
SCONTROL = """#!/bin/bash
# scontrol stub: record the call; `show hostnames` prints the head node
echo "$*" >> "$SCONTROL_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo 127.0.0.1; fi
"""


def _stub(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (what Slurm's process tracking signals for a job step)."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _job_env(tmp_path: Path, data: Path, out: Path, restart_count: int) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir, "srun", SRUN)
    _stub(bin_dir, "scontrol", SCONTROL)
    tiny = ("--arch resnet18 --small-images --image-size 16 --moco-k 32 --bn-splits 2 --moco-m 0.99 --seed 3 "
            "--log-every 0.05 --checkpoint-every-min 0")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "TMPDIR": str(tmp_path), "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
            # what Slurm sets for a two-node job
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node[001-002]", "SLURM_NNODES": "2",
            "SLURM_NODEID": "0", "SLURM_RESTART_COUNT": str(restart_count),
            # the script's settings: one CPU worker per node with one loader worker (Slurm signals it too), a tiny
            # model on a tiny folder
            "GPUS_PER_NODE": "1", "DATA": str(data), "OUTPUT": str(out), "EPOCHS": "2", "GLOBAL_BATCH": "8",
            "BASE_LR": "0.06", "WORKERS": "1", "RDZV_PORT": str(_free_port()),
            "MOCO": f"{sys.executable} -m moco_transfer.cli", "MOCO_ARGS": tiny,
            "TORCHRUN_ARGS": "--local-addr 127.0.0.1"}


def _requeues(tmp_path: Path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return [line for line in log.read_text().splitlines() if line.startswith("requeue")] if log.exists() else []


def test_script_settings() -> None:
    """The Slurm directives the rest relies on, and a script bash can parse."""
    text = SCRIPT.read_text()
    for directive in ("--signal=USR1@180", "--requeue", "--open-mode=append", "--ntasks-per-node=1"):
        assert re.search(rf"^#SBATCH {re.escape(directive)}\b", text, re.M), directive
    assert "--resume auto" in text and "trap '' USR1" in text
    assert re.search(r"^export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=\$\{TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1\}", text,
                     re.M)  # restarts get a fresh store (moco_transfer.distributed._elastic_store says why)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1 ahead of the limit", "TERM at the limit"])
def test_a_signal_to_the_step_stops_both_nodes_requeues_and_the_requeued_job_finishes(tmp_path: Path,
                                                                                       sig: signal.Signals) -> None:
    data = write_class_folders(tmp_path / "data", classes=2, per_class=80)  # 20 steps of 4 images per worker
    out = tmp_path / "run"
    env = _job_env(tmp_path, data, out, restart_count=0)
    job = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    lines: list[str] = []
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith("epoch 1/2: ") and not line.startswith("epoch 1/2: 0/"):
                srun = next(p for p in _descendants(job.pid) if Path(f"/proc/{p}/cmdline").read_bytes()
                            .split(b"\0")[1:2] == [str(tmp_path / "bin" / "srun").encode()])
                for pid in _descendants(srun):  # the step's processes: agents, shells, workers, loader workers
                    os.kill(pid, sig)
                break
        rest = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
        rest.start()
        job.wait(timeout=240)
        rest.join(timeout=10)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = "".join(lines)
    assert job.returncode == 75, output[-4000:]
    assert f"stopped by {sig.name}" in output and "requeueing job 4242" in output, output[-4000:]
    assert "DataLoader worker" not in output, output[-4000:]
    assert _requeues(tmp_path) == ["requeue 4242"]
    assert (out / MID_EPOCH_NAME).exists() or (out / "checkpoint_0000.pth.tar").exists()
    assert "show hostnames node[001-002]" in (tmp_path / "scontrol.log").read_text()

    # the requeued job: same command, Slurm counts the restart; it resumes and ends without a requeue
    again = subprocess.run(["bash", str(SCRIPT)], env=_job_env(tmp_path, data, out, restart_count=1),
                           capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "(start 2)" in again.stdout
    assert _requeues(tmp_path) == ["requeue 4242"]
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert json.loads((out / "pretrain.json").read_text())["epochs"] == 2
