"""The DMDD network: frozen teacher, decoupled student with PMN, and the segmentation network (docs/design.md §1, §4)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from dmdd.config import ModelConfig
from dmdd.models.backbone import Backbone, build_backbone
from dmdd.models.global_score import FeatureGaussian
from dmdd.models.losses import cosine_distance
from dmdd.models.regional import RegionalGaussian, windows_of
from dmdd.models.segmentation import SegmentationHead, gaussian_blur, pyramid_upsample, top_k_score
from dmdd.models.student import DecoupledStudent, PyramidModelingNetwork
from dmdd.models.support import ForegroundSupport


class InferenceOutput(NamedTuple):
    """Eval-mode output; the ONNX graph names its outputs after these fields."""

    pred_score: torch.Tensor  # (B,)
    anomaly_map: torch.Tensor  # (B, 1, H, W)


class SegmentationOutput(NamedTuple):
    """Train-mode output of ``forward``: what L_seg needs."""

    logits: torch.Tensor  # (B, 1, H, W)
    pred_score: torch.Tensor  # (B,)


class Features(NamedTuple):
    """Per-stage features of one batch; a branch that is switched off is ``None``."""

    teacher: list[torch.Tensor]
    normality: list[torch.Tensor] | None
    abnormality: list[torch.Tensor] | None


class DMDD(nn.Module):
    """Dual-Modeling Decouple Distillation.

    Inputs are RGB images in [0, 1], (B, 3, S, S) with S = ``cfg.image_size``; normalisation happens inside, so an
    exported graph takes the same input.

    Args:
        cfg: model configuration.
        backbone: a prebuilt backbone (else built from ``cfg``).
    """

    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        backbone = backbone or build_backbone(cfg.backbone, cfg.pretrained, cfg.weights)
        self.channels = backbone.channels
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self.student = DecoupledStudent(backbone.stages, backbone.channels)
        self.teacher = backbone.stages
        self.teacher.requires_grad_(False)
        self.use_normality = cfg.branches in ("both", "normality")
        self.use_abnormality = cfg.branches in ("both", "abnormality")
        pmn = dict(channels=backbone.channels, inner=cfg.pmn_inner, outer=cfg.pmn_outer)
        self.pmn_normality = PyramidModelingNetwork(direction="top-down-top", **pmn) if self.use_normality else None
        self.pmn_abnormality = (
            PyramidModelingNetwork(direction="down-top-down", **pmn) if self.use_abnormality else None
        )
        self.num_maps = len(cfg.map_stages) * (int(self.use_normality) + int(self.use_abnormality))
        self.fused = fused_indices(cfg)
        self.segmentation = (
            SegmentationHead(
                self.num_maps,
                cfg.image_size,
                cfg.seg_channels,
                cfg.multi_perception,
                cfg.global_attention_size,
                cfg.msn_residual,
            )  # fmt: skip
            if cfg.msn
            else None
        )
        # Per-map statistics of held-out good images (set by dmdd.evaluation.fit_map_statistics); identity until then.
        self.register_buffer("map_mean", torch.zeros(self.num_maps))
        self.register_buffer("map_std", torch.ones(self.num_maps))
        # Image-level score from pooled teacher features (fitted by dmdd.evaluation.fit_teacher_gaussians).
        self.global_score = None
        if cfg.global_score != "off":
            self.global_score = FeatureGaussian(backbone.channels, cfg.global_score, cfg.global_stages)
        # Regional texture-statistics map (fitted by dmdd.evaluation.fit_teacher_gaussians; the engine resolves "auto").
        self.regional = None
        if cfg.regional_score != "off":
            self.regional = RegionalGaussian(backbone.channels, windows_of(cfg.regional_windows),
                                             bank=cfg.regional_bank)
        # Where the object can be (fitted by the engine from the training foregrounds; "auto" is resolved there).
        self.support = ForegroundSupport(cfg.image_size) if cfg.foreground_support == "on" else None
        self.train()

    def train(self, mode: bool = True) -> DMDD:
        """Like ``nn.Module.train``, but the teacher (and, if configured, the student's BatchNorm) stay in eval."""
        super().train(mode)
        self.teacher.eval()
        if self.cfg.student_bn_frozen:
            for module in self.student.stages.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def student_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(pretrained student stages, new parts: 1x1 splits and PMN) — they take separate learning rates."""
        pretrained = list(self.student.stages.parameters())
        new = list(self.student.splits.parameters())
        for pmn in (self.pmn_normality, self.pmn_abnormality):
            if pmn is not None:
                new += list(pmn.parameters())
        return pretrained, new

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> the backbone's normalised input."""
        return (images - self.mean) / self.std

    @torch.no_grad()
    def teacher_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen teacher's four stage outputs of normalised input ``x``."""
        feats = []
        for stage in self.teacher:
            x = stage(x)
            feats.append(x)
        return feats

    def features(self, images: torch.Tensor) -> Features:
        """Teacher features and the student's PMN-refined normality / abnormality features of (B, 3, S, S) images."""
        x = self.normalize(images)
        teacher = self.teacher_features(x)
        normality, abnormality = self.student(x)
        return Features(
            teacher=teacher,
            normality=self.pmn_normality(normality) if self.pmn_normality is not None else None,
            abnormality=self.pmn_abnormality(abnormality) if self.pmn_abnormality is not None else None,
        )

    def stage_maps(self, feats: Features) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """M_i^NGM and M_i^AIM: cosine distances to the teacher, each (B, 1, H_i, W_i); an off branch gives []."""
        ngm = [cosine_distance(t, s) for t, s in zip(feats.teacher, feats.normality)] if feats.normality else []
        aim = [cosine_distance(t, s) for t, s in zip(feats.teacher, feats.abnormality)] if feats.abnormality else []
        return ngm, aim

    def stack(self, ngm: list[torch.Tensor], aim: list[torch.Tensor], size, normalized: bool = True) -> torch.Tensor:
        """Stage maps -> the K maps of ``cfg.map_stages``, pyramid-fused among themselves when configured and
        upsampled to ``size``: (B, K, *size).

        With ``normalized`` and ``cfg.map_normalization`` each map is standardised by the statistics of held-out
        good images (``map_mean``, ``map_std``).
        """
        keep = [i - 1 for i in self.cfg.map_stages]
        ngm, aim = [ngm[i] for i in keep] if ngm else [], [aim[i] for i in keep] if aim else []
        if self.cfg.pyramid_upsampling and self.segmentation is not None:
            stages = self.cfg.map_stages
            ngm, aim = pyramid_upsample(ngm, aim, [2 ** (b - a) for a, b in zip(stages, stages[1:])])
        maps = torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in ngm + aim], 1)
        if normalized and self.cfg.map_normalization:
            maps = (maps - self.map_mean.view(1, -1, 1, 1)) / self.map_std.view(1, -1, 1, 1)
        return maps

    def stacked_maps(self, images: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """The K anomaly maps of (B, 3, S, S) images at the input size: (B, K, S, S); see :meth:`stack`."""
        return self.stack(*self.stage_maps(self.features(images)), images.shape[-2:], normalized)

    def smooth(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Gaussian smoothing of the final (B, 1, S, S) map (``cfg.map_sigma``, 0 = none)."""
        return gaussian_blur(anomaly_map, self.cfg.map_sigma) if self.cfg.map_sigma > 0 else anomaly_map

    def fused_map(self, stacked: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Eval-mode fusion of the (B, K, S, S) stacked maps into the (B, 1, S, S) anomaly map; with the teacher
        features and ``cfg.regional_score`` fitted, plus the regional map (:mod:`dmdd.models.regional`); with
        ``cfg.foreground_support`` on, times the support (:mod:`dmdd.models.support`)."""
        if self.segmentation is None:  # "w/o MSN": the plain sum (of the maps of cfg.fused_stages, where set)
            anomaly_map = (stacked if self.fused is None else stacked[:, self.fused]).sum(dim=1, keepdim=True)
        else:
            anomaly_map = torch.sigmoid(self.segmentation(stacked))
        if self.regional is not None and teacher is not None:
            # the smoothing is linear and keeps constants (replicated borders): smoothing the standardised sum once
            # equals summing the two smoothed maps standardised by their (smoothed) pixel statistics; two separate
            # smoothings added up were miscompiled by OpenVINO 2026.4 (it returned one of the two addends)
            anomaly_map = self.regional.combine(anomaly_map, self.regional.raw_map(teacher, anomaly_map.shape[-2:]))
        anomaly_map = self.smooth(anomaly_map)
        return self.support(anomaly_map) if self.support is not None else anomaly_map

    def fuse(self, stacked: torch.Tensor, teacher: list[torch.Tensor] | None = None) -> InferenceOutput:
        """Eval-mode anomaly map (:meth:`fused_map`) and image score; with the teacher features and
        ``cfg.global_score`` on, the score also weighs the global one (see :meth:`map_score`)."""
        anomaly_map = self.fused_map(stacked, teacher)
        score = self.map_score(anomaly_map)
        if self.global_score is not None and teacher is not None:
            score = self.global_score.combine(score, teacher)
        return InferenceOutput(score, anomaly_map)

    def map_score(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """The image score the anomaly map alone gives: the top-k mean (the MSN's always), or its maximum."""
        if self.segmentation is None and self.cfg.image_score == "max":
            return anomaly_map.flatten(1).amax(dim=1)
        return top_k_score(anomaly_map, self.cfg.top_k)

    def forward(self, images: torch.Tensor) -> InferenceOutput | SegmentationOutput:
        """``InferenceOutput(pred_score (B,), anomaly_map (B, 1, S, S))``, or ``SegmentationOutput`` while the
        segmentation head is in train mode.

        While the head trains, teacher and student run without gradients (paper §3.1: T and S are frozen); put the
        model in eval mode and only ``model.segmentation`` in train mode. Student training uses :meth:`distill`.
        """
        if self.segmentation is not None and self.segmentation.training:
            with torch.no_grad():
                stacked = self.stacked_maps(images)
            logits = self.segmentation(stacked)
            return SegmentationOutput(logits, top_k_score(torch.sigmoid(logits), self.cfg.top_k))
        feats = self.features(images)
        return self.fuse(self.stack(*self.stage_maps(feats), images.shape[-2:]), feats.teacher)

    def distill(self, normal: torch.Tensor, anomalous: torch.Tensor) -> tuple[Features, Features]:
        """Features of a batch of normal images and their synthetic anomalous copies (teacher run once on both).

        Returns:
            (features of the normal images, features of the anomalous images), split from one 2B batch.
        """
        return split_pairs(self.features(torch.cat([normal, anomalous], dim=0)), normal.shape[0])


def map_stage_of(cfg: ModelConfig) -> list[int]:
    """The stage of each of the K stacked maps (NGM maps of ``cfg.map_stages``, then AIM maps)."""
    branches = int(cfg.branches in ("both", "normality")) + int(cfg.branches in ("both", "abnormality"))
    return list(cfg.map_stages) * branches


def fused_indices(cfg: ModelConfig) -> list[int] | None:
    """Which of the K stacked maps the plain sum adds up: ``None`` for all of them (``cfg.fused_stages`` unset or
    equal to ``cfg.map_stages``)."""
    if cfg.fused_stages is None or set(cfg.fused_stages) == set(cfg.map_stages):
        return None
    return [k for k, stage in enumerate(map_stage_of(cfg)) if stage in cfg.fused_stages]


def split_pairs(feats: Features, b: int) -> tuple[Features, Features]:
    """Features of a 2B batch (B normal images, then their B anomalous copies) -> (normal, anomalous) halves."""

    def half(xs: list[torch.Tensor] | None, first: bool) -> list[torch.Tensor] | None:
        return None if xs is None else [x[:b] if first else x[b:] for x in xs]

    return (
        Features(half(feats.teacher, True), half(feats.normality, True), half(feats.abnormality, True)),
        Features(half(feats.teacher, False), half(feats.normality, False), half(feats.abnormality, False)),
    )
