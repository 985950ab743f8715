"""Thresholds without test labels (held-out good training images and synthetic anomalies made from them), and
the decisions a threshold makes on a labelled split."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dmdd.config import Config
from dmdd.data.datasets import PairDataset, Record
from dmdd.data.foreground import ForegroundCache
from dmdd.data.synthesis import AnomalySynthesizer
from dmdd.evaluation import metrics
from dmdd.evaluation.predictions import Predictions, run_model
from dmdd.models.dmdd import DMDD

CALIBRATION_STREAM = 10_000  # rng stream of the synthetic anomalies used for calibration

def _youden_threshold(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Threshold ``score >= t`` maximising TPR - FPR between two score samples."""
    labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
    fpr, tpr, thr = metrics.roc_curve(labels, np.r_[normal, anomalous])
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thr[best])


def normal_threshold(normal: np.ndarray, target_fpr: float) -> float:
    """Smallest sample quantile that leaves at most ``target_fpr`` of the good-sample scores above it (``score >= t``
    is anomalous): with few held-out images this is their maximum or close to it."""
    flat = np.sort(np.asarray(normal, dtype=np.float64).ravel())
    allowed = int(np.floor(target_fpr * flat.size))  # samples that may lie strictly above the threshold
    return float(np.nextafter(flat[flat.size - 1 - allowed], np.inf))


@torch.inference_mode()
def calibrate(model: DMDD, records: list[Record], cfg: Config, device: torch.device) -> dict[str, Any]:
    """Image and pixel thresholds from held-out good training images (and synthetic anomalies made from them).

    No test image or label is involved. Both operating points are computed and stored; ``cfg.train.threshold_mode``
    picks the one used by default:

    - ``normal``: the image threshold leaves ``target_fpr`` of the held-out good images above it, the pixel
      threshold ``pixel_target_fpr`` of their pixels;
    - ``synthetic``: the image threshold maximises TPR - FPR between good images and synthetic anomalies, the pixel
      threshold maximises pixel F1 on the synthetic masks.
    """
    model.eval()
    synthesizer = AnomalySynthesizer(cfg.synthesis)
    pairs = PairDataset(records, cfg.model.image_size, synthesizer, cfg.train.seed, ForegroundCache(cfg.synthesis),
                        cfg.model.resize)  # fmt: skip
    pairs.set_epoch(0, CALIBRATION_STREAM)
    normal_scores, anomalous_scores, normal_maps, anomalous_maps, anomalous_masks = [], [], [], [], []
    for start in range(0, len(pairs), 8):
        batch = [pairs[i] for i in range(start, min(start + 8, len(pairs)))]
        normal = torch.stack([b[0] for b in batch])
        anomalous = torch.stack([b[1] for b in batch])
        s_n, m_n = run_model(model, normal, device)
        s_a, m_a = run_model(model, anomalous, device)
        normal_scores.append(s_n)
        anomalous_scores.append(s_a)
        normal_maps.append(m_n)
        anomalous_maps.append(m_a)
        anomalous_masks.append(torch.stack([b[2] for b in batch])[:, 0].numpy().astype(bool))
    normal_s, anomalous_s = np.concatenate(normal_scores), np.concatenate(anomalous_scores)
    normal_m, anomalous_m, masks = map(np.concatenate, (normal_maps, anomalous_maps, anomalous_masks))
    t = cfg.train
    by_normal = {"image": normal_threshold(normal_s, t.target_fpr),
                 "pixel": normal_threshold(normal_m, t.pixel_target_fpr),
                 "target_fpr": t.target_fpr, "pixel_target_fpr": t.pixel_target_fpr}  # fmt: skip
    pixel_maps, pixel_masks = np.concatenate([normal_m, anomalous_m]), np.concatenate([np.zeros_like(masks), masks])
    by_synthetic = {
        "image": _youden_threshold(normal_s, anomalous_s),
        "pixel": metrics.f1_max(pixel_masks, pixel_maps)[1] if masks.any() else by_normal["pixel"],
    }
    chosen = by_normal if t.threshold_mode == "normal" else by_synthetic
    labels = np.r_[np.zeros(normal_s.size), np.ones(anomalous_s.size)]
    return {
        "image": chosen["image"],
        "pixel": chosen["pixel"],
        "mode": t.threshold_mode,
        "normal": by_normal,
        "synthetic": by_synthetic,
        "normal_images": int(normal_s.size),
        "synthetic_anomalies": int(anomalous_s.size),
        # Label-free validation figures (held-out normals vs synthetic anomalies), usable for model choices.
        "synthetic_image_auroc": metrics.auroc(labels, np.r_[normal_s, anomalous_s]),
        "synthetic_pixel_auroc": metrics.auroc(pixel_masks, pixel_maps) if masks.any() else None,
        "source": "held-out good training images and synthetic anomalies made from them (no test data)",
    }


def operating_point(p: Predictions, threshold: float) -> dict[str, Any]:
    """Decisions ``score >= threshold`` on a labelled split: false alarms on good images, detections per type."""
    flagged = p.scores >= threshold
    types = np.asarray(p.defect_types)
    good = p.labels == 0
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "false_alarm_rate": float(flagged[good].mean()) if good.any() else None,
        "detection_rate": float(flagged[~good].mean()) if (~good).any() else None,
        "good_images": int(good.sum()),
        "defective_images": int((~good).sum()),
        "per_defect_type": {t: float(flagged[types == t].mean()) for t in sorted(set(types) - {"good"})},
    }
    if good.any() and (~good).any():  # the best detection rate the scores allow at the same false-alarm rate
        allowed = int(np.floor(out["false_alarm_rate"] * good.sum()))
        best_t = np.sort(p.scores[good])[good.sum() - 1 - allowed] if allowed < good.sum() else -np.inf
        out["best_detection_rate_at_same_false_alarms"] = float((p.scores[~good] > best_t).mean())
    return out
