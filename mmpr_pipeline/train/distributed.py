"""Processes and devices: one process per device, gradients averaged by one all-reduce per step.

Runs on one device as it is, and data-parallel with the same command under a launcher (`torchrun`,
`accelerate launch`). Gradients are averaged explicitly rather than by a DistributedDataParallel
wrapper, because a process's micro-batch can be empty (all its pairs too long), and DDP would wait
forever for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # strategy: fsdp

    @property
    def lockstep(self) -> bool:
        """Every process must run every forward (FSDP's gathers are collective), even with no pair."""
        return self.sharded and self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(sharded: bool = False) -> Dist:
    """One process per device; `torchrun` and `accelerate launch` set WORLD_SIZE, RANK, LOCAL_RANK.
    FSDP needs a process group even for one process (a single-GPU check of the sharded path)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif sharded and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank=dist.get_rank() if world > 1 else 0, world=world, device=device, sharded=sharded)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def average_gradients(params: list[torch.nn.Parameter], d: Dist) -> None:
    """Average gradients over processes: one all-reduce per step (no DDP wrapper, see the top)."""
    if d.world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for h in handles:
        h.wait()
    for p in params:
        p.grad /= d.world
