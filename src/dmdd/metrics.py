"""Evaluation metrics as pure numpy functions (DESIGN §7).

All curves are computed after one descending sort, with tied scores collapsed into one operating point, so the
values equal a sweep over every distinct threshold.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _sorted_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true / false positives at each distinct threshold, thresholds descending.

    Returns:
        (tp, fp, thresholds): predicting ``score >= thresholds[j]`` gives ``tp[j]`` true and ``fp[j]`` false positives.
    """
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in size")
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(labels)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    return tp, fp, scores[last_of_tie]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve from (0, 0) to (1, 1).

    Args:
        labels: (N,) 1 = anomalous, 0 = normal; both classes must be present.
        scores: (N,) higher = more anomalous.

    Returns:
        (fpr, tpr, thresholds); ``thresholds[0]`` is ``inf`` for the (0, 0) point.
    """
    tp, fp, thr = _sorted_counts(labels, scores)
    if tp[-1] == 0 or fp[-1] == 0:
        raise ValueError("AUROC needs both normal and anomalous samples")
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]], np.r_[np.inf, thr]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, ties as one point: equals the Mann-Whitney statistic)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(np.trapezoid(tpr, fpr))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t``.

    Returns:
        (F1-max, the threshold reaching it).
    """
    tp, fp, thr = _sorted_counts(labels, scores)
    positives = tp[-1]
    if positives == 0:
        raise ValueError("F1 needs at least one anomalous sample")
    f1 = 2 * tp / (positives + tp + fp)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve (x ascending) from x[0] to ``x_max``, interpolating y at ``x_max``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    area = float(np.trapezoid(y[inside], x[inside]))
    last = int(np.flatnonzero(inside)[-1])
    if last + 1 < x.size and x[last] < x_max:
        x0, x1, y0, y1 = x[last], x[last + 1], y[last], y[last + 1]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve as in the official MVTec AD evaluation.

    Ground-truth regions are 8-connected components of every mask of the test set. At each threshold, the FPR is
    the share of all normal pixels above it and the PRO the mean, over all regions, of the share of each region
    above it. One sort over all pixels; each pixel contributes a fixed increment to the FPR or to the PRO.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly maps.

    Returns:
        (fpr, pro), ascending, starting at (0, 0) and ending at (1, 1).
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    regions = np.zeros(masks.shape, dtype=np.int64)
    structure = np.ones((3, 3), dtype=bool)
    offset = 0
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=structure)
        regions[i] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    if offset == 0:
        raise ValueError("AU-PRO needs at least one anomalous region")
    normal = ~masks
    if not normal.any():
        raise ValueError("AU-PRO needs normal pixels")
    sizes = np.bincount(regions.ravel(), minlength=offset + 1).astype(np.float64)
    increments = np.where(normal, 1.0 / normal.sum(), 0.0).ravel()
    region_flat = regions.ravel()
    pro_inc = np.zeros_like(increments)
    anomalous = region_flat > 0
    pro_inc[anomalous] = 1.0 / (sizes[region_flat[anomalous]] * offset)
    order = np.argsort(-maps.ravel(), kind="mergesort")
    scores = maps.ravel()[order]
    fpr = np.cumsum(increments[order])
    pro = np.cumsum(pro_inc[order])
    keep = np.r_[np.diff(scores) != 0, True]
    fpr, pro = np.clip(fpr[keep], 0, 1), np.clip(pro[keep], 0, 1)
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (official MVTec AD AU-PRO, divided by the limit)."""
    fpr, pro = pro_curve(masks, maps)
    return trapezoid_to(fpr, pro, fpr_limit) / fpr_limit
