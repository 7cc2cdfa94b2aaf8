"""Two CPU processes over gloo: the cross-rank key shuffle, the shared queue, and a torchrun pretraining run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from moco_transfer.checkpoint import load_checkpoint

from .test_builder import tiny_moco
from .test_pretrain_engine import _tiny_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # ranks disagree on RNG; the permutation must still be shared
        model = tiny_moco()
        x = torch.arange(4 * 6, dtype=torch.float32).view(4, 6) + 100 * rank
        shuffled, inverse = model._shuffle(x)
        restored = model._unshuffle(shuffled, inverse)
        keys = F.normalize(torch.full((4, 4), float(rank + 1)), dim=1)
        model.dequeue_and_enqueue(keys)
        torch.save({"x": x, "shuffled": shuffled, "restored": restored, "queue": model.queue,
                    "ptr": int(model.queue_ptr)}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shuffle_across_ranks_and_shared_queue(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for i in range(2):
        assert torch.equal(r[i]["restored"], r[i]["x"])
    everything = torch.cat([r[0]["x"], r[1]["x"]])
    shuffled = torch.cat([r[0]["shuffled"], r[1]["shuffled"]])
    assert sorted(shuffled[:, 0].tolist()) == sorted(everything[:, 0].tolist())  # a permutation of all rows
    assert not torch.equal(r[0]["shuffled"], r[0]["x"])
    assert torch.equal(r[0]["queue"], r[1]["queue"])  # both ranks enqueue all 8 keys
    assert r[0]["ptr"] == r[1]["ptr"] == 0  # 8 keys into K = 8
    q = r[0]["queue"].T
    assert torch.allclose(q[:4], F.normalize(torch.ones(4, 4), dim=1))
    assert torch.allclose(q[4:], F.normalize(torch.full((4, 4), 2.0), dim=1))


@pytest.mark.slow
def test_torchrun_two_process_pretraining(tiny_folder, tmp_path):
    # The entry point users type, from this interpreter's own bin (PATH may name another Python's torchrun).
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = ([str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]) + [
        "--standalone", "--nproc_per_node", "2", "-m", "moco_transfer.cli", "pretrain",
        *_tiny_args(tiny_folder, tmp_path / "ddp", 2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr + proc.stdout
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint_0001.pth.tar")
    sd = ckpt["state_dict"]
    assert "module.encoder_q.conv1.weight" in sd and "module.module" not in " ".join(sd)
    # 32 images, 2 ranks x 4 per rank: 4 steps of 8 keys per epoch, 2 epochs, K 32
    assert int(sd["module.queue_ptr"]) == (2 * 4 * 8) % 32
    log = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in log] == [1, 2] and all(x["loss"] > 0 for x in log)


def test_a_restarted_torchrun_group_does_not_see_the_last_attempts_keys(monkeypatch):
    """torchrun's shared store outlives a restart; keys written by attempt 0 (a dead rank's gloo address) must be
    invisible to attempt 1, or its connectFullMesh dials a closed port (pytorch/pytorch issue 135712)."""
    from datetime import timedelta

    from moco_transfer.distributed import _elastic_store

    port = _free_port()
    agent = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=timedelta(seconds=10))  # the agent's store
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _elastic_store() is None  # outside torchrun's shared store: init_process_group's own env:// store

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    _elastic_store().set("default_pg/0//cpu//rank_1", "127.0.0.1:41000")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = _elastic_store()
    assert not second.check(["default_pg/0//cpu//rank_1"])
    second.set("default_pg/0//cpu//rank_1", "127.0.0.1:42000")
    assert second.get("default_pg/0//cpu//rank_1") == b"127.0.0.1:42000"
    assert agent.num_keys() >= 2  # both attempts' keys sit side by side in the one store
