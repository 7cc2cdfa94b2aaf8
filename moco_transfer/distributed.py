"""torch.distributed helpers that fall back to single-process behaviour when no group exists."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the process group that torchrun describes in the environment (nccl on GPU, gloo on CPU)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_distributed():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if use_cuda else "gloo"
        store = _elastic_store()
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def pick_device(name: str | None = None) -> torch.device:
    """The device of pretraining and the evaluators (init_from_env joins torchrun's group first).

    None or "auto": this rank's GPU under torchrun, else the GPU when present, else the CPU. "cuda" without an
    index: the same rank's GPU (not every rank on cuda:0). Anything else (cpu, cuda:1) as given.
    """
    device = init_from_env()
    if name in (None, "auto"):
        return device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible")
    return device if name == "cuda" else torch.device(name)


def _elastic_store() -> dist.Store | None:
    """The torchrun agent's shared store, seen through a prefix of this restart attempt; None outside torchrun.

    torchrun (c10d rendezvous) lets workers share the agent's TCPStore, and that store outlives a restart. The
    process group's keys carry no attempt in their names, so after `--max-restarts` brings a group back, a new
    rank can read the address a dead rank published in the previous attempt: gloo's connectFullMesh fails with
    "Connection refused" (NCCL reads a stale unique id): pytorch/pytorch issues 135712 and 167288. Prefixing
    by TORCHELASTIC_RESTART_COUNT keeps every attempt's keys apart. The count is kept by each node's agent;
    the agents of a multi-node job restart together, but an agent that is itself replaced starts again at 0,
    so examples/slurm/pretrain.sbatch also sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store for each
    rendezvous round), which turns this path off.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]), is_master=False, timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"moco_transfer/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (no gradient flows back)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def agree(flags: list[bool], device: torch.device | None = None) -> list[bool]:
    """Each flag true on any rank becomes true on all, so all ranks stop (or save) at the same step: one going on
    alone would hang in the next collective. One tiny all-reduce; `device` defaults to the backend's."""
    if not is_distributed():
        return flags
    if device is None:  # nccl reduces on the current GPU
        device = torch.device("cuda" if dist.get_backend() == "nccl" else "cpu")
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier() -> None:
    if is_distributed():
        dist.barrier()
