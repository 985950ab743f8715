"""Multi-process training with PyTorch DDP, launched by ``torchrun`` (NCCL on GPUs, gloo on CPU).

Each objective below registers as sub-modules exactly the parameters its loss trains, so DDP synchronises those
gradients and nothing else (the frozen teacher has no trainable parameters; the other phase's parameters are
not part of the wrapper).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dmdd.config import Config
from dmdd.losses import aim_loss, ngm_loss, segmentation_loss
from dmdd.models.dmdd import DMDD, Features


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


def student_loss(model: DMDD, normal: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor, cfg: Config):
    """L_NGM + L_AIM on a batch of pairs; returns (total, ngm, aim) with an unused branch at 0."""
    return pair_loss(*model.distill(normal, anomalous), mask, cfg)


def pair_loss(fn: Features, fa: Features, mask: torch.Tensor, cfg: Config):
    """L_NGM + L_AIM from the features of the normal images (``fn``) and of their anomalous copies (``fa``)."""
    zero = torch.zeros((), device=mask.device)
    ngm = ngm_loss(fn.teacher, fn.normality, fa.normality) if fn.normality is not None else zero
    aim = zero
    if fn.abnormality is not None:
        aim = aim_loss(fn.teacher, fn.abnormality, torch.zeros_like(mask)) + aim_loss(fa.teacher, fa.abnormality, mask)
    return cfg.train.ngm_weight * ngm + cfg.train.aim_weight * aim, ngm, aim


class StudentObjective(nn.Module):
    """Student-phase loss; sub-modules: the student and the PMN branches (what L_NGM + L_AIM train)."""

    def __init__(self, model: DMDD, cfg: Config) -> None:
        super().__init__()
        self.student = model.student
        self.pmn_normality = model.pmn_normality
        self.pmn_abnormality = model.pmn_abnormality
        self._model = (model,)  # a plain reference, not a sub-module
        self.cfg = cfg

    def forward(self, normal: torch.Tensor, anomalous: torch.Tensor, mask: torch.Tensor):
        return student_loss(self._model[0], normal, anomalous, mask, self.cfg)


class SegmentationObjective(nn.Module):
    """Segmentation-phase loss (eq. 5); sub-module: the segmentation head only."""

    def __init__(self, model: DMDD) -> None:
        super().__init__()
        self.head = model.segmentation
        self._model = (model,)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        out = self._model[0](images)
        return segmentation_loss(out.logits, out.pred_score, masks)


def wrap(objective: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """DDP-wrap an objective in a multi-process run; BatchNorm becomes SyncBatchNorm on GPUs."""
    if not ctx.active:
        return objective
    if device.type == "cuda":  # SyncBatchNorm runs on accelerators only
        objective = nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=ids)
