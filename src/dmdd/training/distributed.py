"""Multi-process training with PyTorch DDP, launched by ``torchrun`` (NCCL on GPUs, gloo on CPU).

Each objective (:mod:`dmdd.training.objective`) registers as sub-modules exactly the parameters its loss trains, so DDP synchronises those
gradients and nothing else (the frozen teacher has no trainable parameters; the other phase's parameters are
not part of the wrapper).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world == 1`` for an ordinary single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def from_main(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` on every rank: a decision taken from a rank's own clock (a ``--minutes`` plan) must be
        the same everywhere, or the ranks would stop at different steps and wait for each other for ever."""
        if not self.active:
            return value
        shared = torch.tensor([value], dtype=torch.long, device=device)
        dist.broadcast(shared, 0)
        return int(shared.item())


def init_distributed() -> DistContext:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local_rank, owns)


def close_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP-wrap an objective in a multi-process run; BatchNorm becomes SyncBatchNorm on GPUs."""
    if not ctx.active:
        return objective
    if device.type == "cuda":  # SyncBatchNorm runs on accelerators only
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=ids)
