"""Evaluation metrics as pure numpy functions (docs/design.md §7).

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


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected ground-truth components over the whole set, labelled 1..R (0 = normal): ((N, H, W) int32, R)."""
    regions = np.zeros(masks.shape, dtype=np.int32)
    structure = np.ones((3, 3), dtype=bool)
    offset = 0
    for i in range(masks.shape[0]):
        count = ndimage.label(masks[i], structure=structure, output=regions[i])
        regions[i][regions[i] > 0] += offset
        offset += count
    return regions, offset


def _pro_points(
    regions: np.ndarray, scores: np.ndarray, sizes: np.ndarray, normal_total: int
) -> tuple[np.ndarray, np.ndarray]:
    """FPR and PRO after each distinct score (descending) of the given pixels; one sort.

    Each normal pixel adds 1 / ``normal_total`` to the FPR, each pixel of region r adds 1 / (|r| R) to the PRO,
    with |r| = ``sizes[r]`` counted over the whole set and R = ``len(sizes) - 1``.
    """
    order = np.argsort(scores)[::-1]  # ties are collapsed below, so the sort need not be stable
    scores, regions = scores[order], regions[order]
    normal = regions == 0
    fpr = np.cumsum(normal) / normal_total
    pro_inc = np.zeros(scores.size)
    pro_inc[~normal] = 1.0 / (sizes[regions[~normal]] * (sizes.size - 1))
    pro = np.cumsum(pro_inc)
    keep = np.r_[scores[1:] != scores[:-1], True]
    return np.clip(fpr[keep], 0, 1), np.clip(pro[keep], 0, 1)


def _check_pro_inputs(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    masks = masks if masks.dtype == bool else masks != 0
    maps = np.asarray(maps)
    if masks.shape != maps.shape or masks.ndim != 3:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} must both be (N, H, W)")
    if not masks.any():
        raise ValueError("AU-PRO needs at least one anomalous region")
    if masks.all():
        raise ValueError("AU-PRO needs normal pixels")
    return masks, maps


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve as in the official MVTec AD evaluation.

    Ground-truth regions are 8-connected components of every mask of the test set. At each threshold, the FPR is
    the share of all normal pixels above it and the PRO the mean, over all regions, of the share of each region
    above it.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly maps.

    Returns:
        (fpr, pro), ascending, starting at (0, 0) and ending at (1, 1).
    """
    masks, maps = _check_pro_inputs(masks, maps)
    regions, count = _regions(masks)
    sizes = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
    fpr, pro = _pro_points(regions.ravel(), maps.ravel(), sizes, int(sizes[0]))
    return np.r_[0.0, fpr, 1.0], np.r_[0.0, pro, 1.0]


def au_pro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (official MVTec AD AU-PRO, divided by the limit).

    Equal to the trapezoidal integral of :func:`pro_curve` (with interpolation at the limit), computed without
    sorting the normal pixels: between two distinct thresholds the curve moves right by the normal pixels of the
    lower threshold and up by its anomalous pixels, so a normal pixel of score s adds
    (1 / normal pixels) x (PRO(> s) + PRO(>= s)) / 2 to the area. PRO(> s) and PRO(>= s) come from one sort of the
    anomalous pixels (binary search); the normal pixels past the limit are cut with a linear-time partition.

    Args:
        masks: (N, H, W) ground truth, nonzero = anomalous.
        maps: (N, H, W) anomaly maps.
        fpr_limit: integrate the FPR from 0 to this value.
    """
    masks, maps = _check_pro_inputs(masks, maps)
    regions, count = _regions(masks)
    labels, scores = regions.ravel(), maps.ravel()
    sizes = np.bincount(labels, minlength=count + 1).astype(np.float64)
    normal = labels == 0
    normal_scores, anomalous = scores[normal], ~normal
    order = np.argsort(scores[anomalous])
    ascending = scores[anomalous][order]
    increments = 1.0 / (sizes[labels[anomalous]] * count)
    at_or_above = np.r_[np.cumsum(increments[order][::-1])[::-1], 0.0]  # PRO of anomalous pixels from index j up

    def pro(s: np.ndarray | float, strict: bool) -> np.ndarray:
        return at_or_above[np.searchsorted(ascending, s, side="right" if strict else "left")]

    def pro_sum(s: np.ndarray) -> float:
        """Σ PRO(> s) + PRO(>= s) over an array of normal scores; one binary search except at tied scores."""
        right = np.searchsorted(ascending, s, side="right")
        left = right.copy()
        tied = (right > 0) & (ascending[np.maximum(right - 1, 0)] == s)
        left[tied] = np.searchsorted(ascending, s[tied], side="left")
        return float(at_or_above[right].sum() + at_or_above[left].sum())

    total = normal_scores.size
    k = int(np.floor(fpr_limit * total)) + 1  # the k-th highest normal score is where the FPR passes the limit
    if k > total:  # the whole curve lies inside the limit; (1, 1) closes it with zero width
        return pro_sum(normal_scores) / (2 * total) / fpr_limit
    normal_scores.partition(total - k)  # in place: the k highest normal scores now sit at the end
    cut = normal_scores[total - k]
    top = normal_scores[total - k :]
    inside = top[top > cut]
    area = pro_sum(inside) / (2 * total)
    x0, x1 = inside.size / total, (inside.size + np.count_nonzero(normal_scores == cut)) / total
    y0, y1 = float(pro(cut, True)), float(pro(cut, False))
    y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
    area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return float(area / fpr_limit)
