"""Thresholds without test labels (held-out good training images and synthetic anomalies made from them), and
the decisions a threshold makes on a labelled split."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dmdd.config import Config
from dmdd.data.datasets import PairDataset, Record
from dmdd.data.foreground import ForegroundCache
from dmdd.data.io import TILED_DECODE_PIXELS, decoded_size, read_image
from dmdd.data.synthesis import AnomalySynthesizer
from dmdd.data.tiles import TileSpec, grid, scaled_shape
from dmdd.evaluation import metrics
from dmdd.evaluation.predictions import Predictions, run_model, score_tiled_image
from dmdd.models.dmdd import DMDD

CALIBRATION_STREAM = 10_000  # rng stream of the synthetic anomalies used for calibration

def _youden_threshold(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Threshold ``score >= t`` maximising TPR - FPR between two score samples."""
    labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
    fpr, tpr, thr = metrics.roc_curve(labels, np.r_[normal, anomalous])
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thr[best])


def normal_threshold(normal: np.ndarray, target_fpr: float) -> float:
    """The threshold (``score >= t`` is anomalous) that a new good sample exceeds with probability at most
    ``target_fpr``, from good samples alone: see :func:`normal_threshold_method`."""
    return normal_threshold_method(normal, target_fpr)[0]


def normal_threshold_method(normal: np.ndarray, target_fpr: float) -> tuple[float, str]:
    """(threshold, method) from good samples alone at a target false-alarm rate on new good samples.

    ``quantile``: just above the k-th highest of the n samples, k = floor(target (n + 1)); a new exchangeable sample
    lies above it with probability k / (n + 1) <= target (the conformal quantile, no assumption on the scores).

    ``tail``: with fewer than 1/target - 1 samples no order statistic is high enough (5 held-out images cannot set a
    1 % rate: above their maximum a new one still lies with probability 1/6). Then a normal distribution is fitted to
    the scores and the threshold is the upper one-sided prediction bound m + t s sqrt(1 + 1/n) at level 1 - target
    (t: Student's t quantile, n - 1 degrees of freedom), never below the samples' maximum. Image scores are sums of
    standardised parts (they can be negative), so the fit is on the scores themselves; measured against the
    maximum on subsampled hold-outs in docs/decisions.md. With fewer than 3 samples nothing can be fitted
    and the maximum is used (``max``).
    """
    from scipy import stats

    from dmdd.evaluation.labelled import allowed_above

    flat = np.sort(np.asarray(normal, dtype=np.float64).ravel())
    n = flat.size
    allowed = allowed_above(n, target_fpr)
    if allowed >= 0:
        return float(np.nextafter(flat[n - 1 - allowed], np.inf)), "quantile"
    above_max = float(np.nextafter(flat[-1], np.inf))
    if n < 3:
        return above_max, "max"
    bound = flat.mean() + stats.t.ppf(1 - target_fpr, n - 1) * flat.std(ddof=1) * np.sqrt(1 + 1 / n)
    return max(float(bound), above_max), "tail"


def calibration_pairs(records: list[Record], cfg: Config) -> PairDataset:
    """The held-out images and their synthetic anomalies that :func:`calibrate` scores, decoded (and their
    foregrounds found) now: built before training, the end of a ``--minutes`` run only runs the model."""
    return PairDataset(records, cfg.model.image_size, AnomalySynthesizer(cfg.synthesis), cfg.train.seed,
                       ForegroundCache(cfg.synthesis), cfg.model.resize, TileSpec.of(cfg.model))  # fmt: skip


def calibration_forwards(records: list[Record], cfg: Config) -> int:
    """How many model inputs :func:`calibrate` runs: a good and a synthetic one per held-out image, and with
    tiles every grid tile of each held-out image (its image-level score)."""
    tiles = TileSpec.of(cfg.model)
    count = 2 * len(records)
    if tiles is not None:
        for r in records:
            h, w = scaled_shape(decoded_size(r.image), tiles)
            count += len(grid((max(h, tiles.size), max(w, tiles.size)), tiles))
    return count


@torch.inference_mode()
def calibrate(model: DMDD, records: list[Record], cfg: Config, device: torch.device,
              pairs: PairDataset | None = None, held_out: bool = True) -> dict[str, Any]:  # fmt: skip
    """Image and pixel thresholds from held-out good training images (and synthetic anomalies made from them).
    With ``held_out`` (``records`` were not trained on) their image scores are stored too (``normal.scores``):
    ``dmdd calibrate`` pools them with labelled good images (:mod:`dmdd.evaluation.labelled`).

    No test image or label is involved. Both operating points are computed and stored; ``cfg.train.threshold_mode``
    picks the one used by default:

    - ``normal``: the image threshold leaves ``target_fpr`` of the held-out good images above it, the pixel
      threshold ``pixel_target_fpr`` of their pixels;
    - ``synthetic``: the image threshold maximises TPR - FPR between good images and synthetic anomalies, the pixel
      threshold maximises pixel F1 on the synthetic masks.
    """
    model.eval()
    tiles = TileSpec.of(cfg.model)
    pairs = pairs if pairs is not None else calibration_pairs(records, cfg)
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
    if tiles is not None:  # an image's score is its largest tile's: the good-image threshold is set on images
        normal_s = np.array([score_tiled_image(model, read_image(r.image, reduce_above=TILED_DECODE_PIXELS), cfg,
                                               device)[0] for r in records])  # fmt: skip
    normal_m, anomalous_m, masks = map(np.concatenate, (normal_maps, anomalous_maps, anomalous_masks))
    t = cfg.train
    image_t, method = normal_threshold_method(normal_s, t.target_fpr)
    by_normal = {"image": image_t, "method": method, "pixel": normal_threshold(normal_m, t.pixel_target_fpr),
                 "target_fpr": t.target_fpr, "pixel_target_fpr": t.pixel_target_fpr}  # fmt: skip
    if held_out:
        by_normal["scores"] = [float(x) for x in normal_s]
    if method != "quantile":
        by_normal["note"] = (
            f"{normal_s.size} held-out good image(s) cannot set a {100 * t.target_fpr:g} % false-alarm rate by a "
            f"quantile (that needs {math.ceil(1 / t.target_fpr - 1)}); the image threshold is "
            + ("a normal tail fitted to their scores" if method == "tail" else "their maximum")
            + "; label a few good and defective parts and run dmdd calibrate for a threshold you can trust")
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
    if good.any() and (~good).any():
        out["best_detection_rate_at_same_false_alarms"] = best_detection_at(p.scores[good], p.scores[~good],
                                                                            out["false_alarm_rate"])  # fmt: skip
    return out


def best_detection_at(good: np.ndarray, bad: np.ndarray, false_alarm_rate: float) -> float:
    """The largest share of ``bad`` scores any threshold flags while flagging at most ``false_alarm_rate`` of
    ``good``: what the ranking allows at that false-alarm rate."""
    good = np.sort(np.asarray(good, np.float64))
    allowed = int(np.floor(false_alarm_rate * good.size + 1e-9))
    best_t = good[good.size - 1 - allowed] if allowed < good.size else -np.inf
    return float((np.asarray(bad) > best_t).mean())
