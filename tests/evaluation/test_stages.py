"""The rule by which a few masked rejects choose the map's stages (dmdd.evaluation.stages), against brute force and
on constructed cases where the answer is known."""

from __future__ import annotations

import numpy as np

from dmdd.evaluation import Predictions
from dmdd.evaluation.metrics import auroc
from dmdd.evaluation.stages import ALL, choose, pair_counts, resampled_auroc


def _predictions(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, has_mask=None) -> Predictions:
    n = labels.size
    return Predictions(np.zeros(n), maps, masks, labels, ["good" if y == 0 else "cut" for y in labels],
                       [f"{i}.png" for i in range(n)], np.ones(n, bool) if has_mask is None else has_mask)  # fmt: skip


def _brute_force_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    pos, neg = maps[masks > 0], maps[masks == 0]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def test_the_pixel_auroc_of_any_resample_of_images_follows_from_the_pair_counts():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 1, 1])
    masks = np.zeros((6, 6, 6), np.uint8)
    masks[2, :2, :2] = masks[3, 3:, 3:] = masks[5, 1:4, 2] = 1
    has_mask = np.array([True, True, True, True, False, True])  # image 4: a reject without a mask, pixels unknown
    maps = rng.integers(0, 5, (6, 6, 6)).astype(np.float32)  # ties on purpose
    p = _predictions(maps, masks, labels, has_mask)
    counts, pos, neg, rejects = pair_counts(p)
    known = np.flatnonzero(has_mask)
    assert np.isclose(counts.sum() / (pos.sum() * neg.sum()), _brute_force_auroc(maps[known], masks[known]))
    assert np.isclose(counts.sum() / (pos.sum() * neg.sum()), auroc(masks[known].ravel() > 0, maps[known].ravel()))
    draws = np.array([[2, 0, 1, 0, 3], [0, 1, 2, 1, 1]], float)  # how often each known image is drawn
    for weights, got in zip(draws, resampled_auroc(counts, pos, neg, rejects, draws)):
        repeated = np.repeat(known, weights.astype(int))
        assert np.isclose(got, _brute_force_auroc(maps[repeated], masks[repeated]))
    sub_counts, sub_pos, sub_neg, _ = pair_counts(p, np.array([0, 3, 5]))  # a subset: its own pixels only
    assert np.isclose(sub_counts.sum() / (sub_pos.sum() * sub_neg.sum()),
                      _brute_force_auroc(maps[[0, 3, 5]], masks[[0, 3, 5]]))  # fmt: skip


def test_a_candidate_replaces_all_stages_only_where_the_labelled_images_support_it():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10), np.ones(10)].astype(int)
    masks = np.zeros((20, 16, 16), np.uint8)
    masks[10:, 4:8, 4:8] = 1
    base = rng.normal(0, 1, (20, 16, 16)).astype(np.float32) + 1.0 * masks
    better = base + 0.8 * masks  # every reject's defect stands out more
    lucky = base + np.where(np.arange(20)[:, None, None] == 10, 6.0, -0.05) * masks  # one reject gains, nine lose
    runs = {ALL: _predictions(base, masks, labels), "better": _predictions(better, masks, labels),
            "lucky": _predictions(lucky, masks, labels)}  # fmt: skip
    chosen, report = choose(runs)
    assert chosen == "better" and report["better"]["gain"] > 0 and report["better"]["resamples_with_gain"] == 1.0
    assert report["lucky"]["resamples_with_gain"] < 0.95
    del runs["better"]
    assert report["lucky"]["gain"] > 0 and choose(runs)[0] == ALL  # a labelled gain that one reject makes
    # the same generator seed gives the same choice and report
    assert choose(runs, generator=np.random.default_rng(3)) == choose(runs, generator=np.random.default_rng(3))
