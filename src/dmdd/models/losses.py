"""DMDD losses as pure functions, next to the paper's equations (docs/design.md §3, §4)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """D(x, y)(h, w) = 1 - cos(x(:, h, w), y(:, h, w)) (eq. 1 and 4).

    Args:
        x: (B, C, H, W) features.
        y: (B, C, H, W) features.

    Returns:
        (B, 1, H, W) distance map in [0, 2].
    """
    return 1.0 - F.cosine_similarity(x.float(), y.float(), dim=1, eps=1e-8).unsqueeze(1)


def ngm_loss(
    teacher_normal: Sequence[torch.Tensor],
    student_on_normal: Sequence[torch.Tensor],
    student_on_anomalous: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Normality Guidance Modeling, eq. (1)-(2).

    L_NGM = 1/4 Σ_i 1/(H_i W_i) Σ_{h,w} [D(F_n^T, F_n^{SNGM_i}) + D(F_n^T, F_a^{SNGM_i})], averaged over the batch.
    Both student features regress onto the teacher features of the *normal* image.

    Args:
        teacher_normal: per stage, teacher features of the normal images (B, C_i, H_i, W_i).
        student_on_normal: per stage, the student's normality features on the normal images.
        student_on_anomalous: per stage, the student's normality features on the synthetic anomalous images.
    """
    terms = [
        (cosine_distance(t, s_n) + cosine_distance(t, s_a)).mean()
        for t, s_n, s_a in zip(teacher_normal, student_on_normal, student_on_anomalous, strict=True)
    ]
    return torch.stack(terms).mean()


def aim_loss(
    teacher: Sequence[torch.Tensor], student_abnormal: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Abnormality Inverse Mimicking, eq. (3)-(4).

    L_AIM = 1/4 Σ_i 1/(H_i W_i) Σ_{h,w} |M_i^AIM(h, w) - M_i^gt(h, w)| with M_i^AIM = D(F_i^T, F^{SAIM_i}), averaged
    over the batch. Normal images enter with an all-zero mask, synthetic anomalies with their mask, so the student's
    abnormality features match the teacher on normal pixels and are pushed to distance 1 on anomalous pixels.

    Args:
        teacher: per stage, teacher features of each image (B, C_i, H_i, W_i).
        student_abnormal: per stage, the student's abnormality features of the same images.
        mask: (B, 1, H, W) ground truth in {0, 1}, resized to each stage by area averaging: each cell's target is
            the anomalous share of the pixels it covers (docs/design.md says bilinear; without antialiasing that reads only
            2x2 of the 32x32 pixels of a stage-4 cell, see docs/deviations.md).
    """
    terms = []
    for t, s in zip(teacher, student_abnormal, strict=True):
        m = F.interpolate(mask.float(), size=t.shape[-2:], mode="area")
        terms.append((cosine_distance(t, s) - m).abs().mean())
    return torch.stack(terms).mean()


def segmentation_loss(logits: torch.Tensor, score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_seg = BCE(M, M^gt) + BCE(S, max(M^gt)), eq. (5).

    Args:
        logits: (B, 1, H, W) pre-sigmoid segmentation map (BCE on logits for numerical stability).
        score: (B,) image score S in [0, 1].
        mask: (B, 1, H, W) ground truth in {0, 1}.
    """
    mask = mask.float()
    pixel = F.binary_cross_entropy_with_logits(logits.float(), mask)
    image_target = mask.flatten(1).amax(dim=1)
    eps = 1e-6
    image = F.binary_cross_entropy(score.float().clamp(eps, 1 - eps), image_target)
    return pixel + image
