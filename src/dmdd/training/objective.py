"""The training objectives: the student side's NGM + AIM loss (paper eq. 1-4) and the segmentation head's loss,
each an ``nn.Module`` holding exactly the parameters its loss trains, so DDP (:mod:`dmdd.training.distributed`)
synchronises those gradients and nothing else."""

from __future__ import annotations

import torch
from torch import nn

from dmdd.config import Config
from dmdd.models.dmdd import DMDD, Features
from dmdd.models.losses import aim_loss, ngm_loss, segmentation_loss


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
