"""Distributed set-up for the training loop: the process group, a monitored barrier, scalar all-reduce.

A single process still joins a one-rank process group (collectives, DCP checkpoints and guards
are the same code at every scale). Backend: NCCL with CUDA, gloo otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a guard fired); the message says why."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    monitor_group: object  # a gloo group for monitored barriers (works beside NCCL too)
    owns_group: bool  # we created the default process group (and must destroy it)


def setup_distributed(timeout_s: float) -> DistEnv:
    """Join the torchrun job, or make a one-rank group for a plain single process."""
    timeout = timedelta(seconds=timeout_s)
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            # A private in-memory store: a single process needs no address or port.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    world = dist.get_world_size()
    monitor = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
    return DistEnv(rank=dist.get_rank(), world_size=world, local_rank=local_rank,
                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                   device=device, monitor_group=monitor, owns_group=owns)


def monitored_barrier(env: DistEnv, timeout_s: float, where: str) -> None:
    """A barrier that, on timeout, raises naming the ranks that never arrived."""
    if env.world_size == 1:
        return
    try:
        dist.monitored_barrier(group=env.monitor_group, timeout=timedelta(seconds=timeout_s),
                               wait_all_ranks=True)
    except RuntimeError as e:
        raise TrainingStopped(f"rank {env.rank}: ranks did not reach {where} within {timeout_s:.0f} s "
                              f"(hung or dead rank): {e}") from e


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few scalars over all ranks in one collective (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if env.world_size > 1:
        if env.device.type == "cuda":
            t = t.to(env.device)
        dist.all_reduce(t)
    return t.cpu().tolist()
