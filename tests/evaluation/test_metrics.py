"""Metrics against independent brute-force references: every threshold, plain loops."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from dmdd.evaluation import metrics


def brute_auroc(labels, scores):
    """Probability that a random anomalous sample outranks a random normal one (ties count 1/2)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (pos.size * neg.size)


def brute_f1_max(labels, scores):
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        fp = np.sum(pred & (labels == 0))
        fn = np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def brute_au_pro(masks, maps, limit=0.3):
    """Sweep every distinct threshold; regions as 8-connected components image by image; integrate to `limit`."""
    regions = []
    for mask in masks:
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(len(regions), labelled == k, mask) for k in range(1, n + 1)]
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        above = maps >= t
        fpr = np.sum(above & ~masks) / np.sum(~masks)
        overlaps = []
        for i in range(masks.shape[0]):
            labelled, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
            for k in range(1, n + 1):
                region = labelled == k
                overlaps.append(np.sum(above[i] & region) / np.sum(region))
        points.append((fpr, float(np.mean(overlaps))))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def random_case(seed, n=4, size=12, levels=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n - 1):  # the last image has no defect
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 3, 2)
            h, w = rng.integers(1, 4, 2)  # includes 1-pixel regions
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random(masks.shape) + 0.8 * masks
    if levels:
        maps = np.round(maps * levels) / levels  # heavy ties
    return masks, maps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 7])
def test_au_pro_matches_brute_force(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    assert metrics.au_pro(masks, maps) == pytest.approx(brute_au_pro(masks, maps), abs=1e-9)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_au_pro_other_limits(limit):
    masks, maps = random_case(11, levels=5)
    assert metrics.au_pro(masks, maps, limit) == pytest.approx(brute_au_pro(masks, maps, limit), abs=1e-9)


def three_level_case(masks: np.ndarray, first: tuple[int, int, int], false_alarms: int) -> np.ndarray:
    """Map of one defect pixel at 3 (the pixel ``first``), ``false_alarms`` normal pixels at 2, the other defect
    pixels at 1, the other normal pixels at 0."""
    maps = np.zeros(masks.shape)
    maps[masks] = 1.0
    maps[first] = 3.0
    normal = np.flatnonzero(~masks.ravel())[:false_alarms]
    maps.ravel()[normal] = 2.0
    return maps


def by_hand(pro_first: float, false_alarms: int, normal_pixels: int, limit: float = 0.3) -> float:
    """AU-PRO of a three-level map. Its curve: (0, 0) -> (0, p) at 3 -> (x, p) at 2 with x = false_alarms /
    normal pixels (< limit) -> (x, 1) at 1 -> (1, 1). Up to the limit: p x + (limit - x), over the limit."""
    x = false_alarms / normal_pixels
    assert x < limit
    return (pro_first * x + (limit - x)) / limit


@pytest.mark.parametrize(
    "layout, regions",
    [
        ("apart", 2),  # a 1-pixel region and a 2-pixel region two columns apart: two regions
        ("diagonal", 1),  # the same 3 pixels, the single one touching the pair by a corner: one 8-connected region
        ("two_images", 2),  # the 1-pixel and the 2-pixel region in two images, at overlapping positions: two regions
    ],
)
def test_au_pro_counts_regions_as_8_connected_components_of_each_image(layout, regions):
    masks = np.zeros((2, 4, 5), bool)
    first = (0, 1, 1)
    masks[first] = True
    if layout == "apart":
        masks[0, 1, 4] = masks[0, 2, 4] = True
    elif layout == "diagonal":
        masks[0, 2, 2] = masks[0, 2, 3] = True
    else:
        masks[1, 1, 1] = masks[1, 1, 2] = True
    maps = three_level_case(masks, first, false_alarms=10)  # 10 of 37 normal pixels: x = 0.27
    # Only the single pixel is found at the first threshold: PRO = mean(1, 0) = 1/2 over two regions, but 1/3
    # (one of the three pixels) when the pixels form one region.
    as_two, as_one = by_hand(1 / 2, 10, 37), by_hand(1 / 3, 10, 37)
    assert as_two == pytest.approx(61 / 111) and as_one == pytest.approx(133 / 333)  # (0.3 - 5/37) / 0.3, ...
    expected = as_two if regions == 2 else as_one
    assert metrics.au_pro(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert brute_au_pro(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_au_pro_of_a_perfect_map_is_one():
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = masks[1, 4, 0] = True
    assert metrics.au_pro(masks, masks.astype(float)) == pytest.approx(1.0)
    fpr, pro = metrics.pro_curve(masks, masks.astype(float))
    assert fpr[0] == 0 and pro[-1] == 1 and pro[np.searchsorted(fpr, 0, side="right") - 1] == 1  # all found at FPR 0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("levels", [None, 4])
def test_auroc_and_f1_match_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    labels = (rng.random(60) < 0.4).astype(int)
    scores = rng.random(60) + 0.5 * labels
    if levels:
        scores = np.round(scores * levels) / levels
    assert metrics.auroc(labels, scores) == pytest.approx(brute_auroc(labels, scores), abs=1e-9)
    assert metrics.auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert metrics.f1_max(labels, scores)[0] == pytest.approx(brute_f1_max(labels, scores), abs=1e-9)


def test_pixel_auroc_over_maps_matches_brute_force():
    masks, maps = random_case(3, n=3, size=8, levels=6)
    assert metrics.auroc(masks, maps) == pytest.approx(brute_auroc(masks.ravel().astype(int), maps.ravel()), abs=1e-9)


def test_f1_threshold_reproduces_the_f1():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    f1, t = metrics.f1_max(labels, scores)
    pred = scores >= t
    tp = np.sum(pred & (labels == 1))
    assert f1 == pytest.approx(2 * tp / (pred.sum() + labels.sum()))


def test_degenerate_inputs_raise():
    with pytest.raises(ValueError):
        metrics.auroc(np.zeros(5), np.arange(5))
    with pytest.raises(ValueError):
        metrics.au_pro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))
