"""The rule by which a few masked rejects choose the map's stages (dmdd.evaluation.stages), against brute force and
on constructed cases where the answer is known."""

from __future__ import annotations

import itertools

import numpy as np

from dmdd.evaluation import Predictions
from dmdd.evaluation.stages import ALL, choose, per_reject_auroc, sign_flip_p


def test_the_sign_flip_p_value_is_the_exact_share_of_flips_at_least_as_good():
    rng = np.random.default_rng(0)
    for gains in (rng.normal(0.1, 1, 7), np.full(10, 0.02), np.array([0.3, -0.1, 0.2, 0.05, -0.02])):
        means = [np.mean(np.array(s) * gains) for s in itertools.product((1, -1), repeat=gains.size)]
        assert sign_flip_p(gains) == np.mean(np.array(means) >= gains.mean() - 1e-12)
    assert sign_flip_p(np.full(10, 0.02)) == 1 / 1024  # ten rejects that all gain: the smallest p-value ten give
    many = rng.normal(0.5, 1, 40)  # above 16 pairs: random flips of an explicit generator, close to the normal tail
    assert abs(sign_flip_p(many, np.random.default_rng(1)) - sign_flip_p(many, np.random.default_rng(2))) < 0.01


def _predictions(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> Predictions:
    n = labels.size
    return Predictions(np.zeros(n), maps, masks, labels, ["good" if y == 0 else "cut" for y in labels],
                       [f"{i}.png" for i in range(n)], np.ones(n, bool))  # fmt: skip


def test_per_reject_auroc_ranks_each_defect_against_every_normal_pixel():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 1])
    masks = np.zeros((5, 6, 6), np.uint8)
    masks[2, :2, :2] = masks[3, 3:, 3:] = 1  # image 4 is defective without a masked pixel: it gives no measurement
    maps = rng.integers(0, 4, (5, 6, 6)).astype(np.float32)  # ties on purpose
    p = _predictions(maps, masks, labels)
    for index, rejects in ((None, (2, 3)), (np.array([0, 1, 3]), (3,))):  # a subset: its own normal pixels only
        images = np.arange(5) if index is None else index
        negatives = maps[images][masks[images] == 0]
        out = per_reject_auroc(p, index)
        assert out.size == len(rejects)
        for got, image in zip(out, rejects):
            positives = maps[image][masks[image] == 1]
            pairs = (positives[:, None] > negatives[None]) + 0.5 * (positives[:, None] == negatives[None])
            assert abs(got - pairs.mean()) < 1e-12


def test_a_candidate_replaces_all_stages_only_when_the_rejects_show_its_gain():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10), np.ones(10)].astype(int)
    masks = np.zeros((20, 16, 16), np.uint8)
    masks[10:, 4:8, 4:8] = 1
    base = rng.normal(0, 1, (20, 16, 16)).astype(np.float32) + 1.0 * masks
    better = base + 0.8 * masks  # every reject's defect stands out more
    mixed = base + np.where(np.arange(20)[:, None, None] % 2, 1.5, -1.5) * masks  # half gain, half lose
    runs = {ALL: _predictions(base, masks, labels), "better": _predictions(better, masks, labels),
            "mixed": _predictions(mixed, masks, labels)}  # fmt: skip
    chosen, report = choose(runs)
    assert chosen == "better" and report["better"]["p_value"] == 1 / 1024 and report["better"]["mean_gain"] > 0
    assert report["mixed"]["p_value"] > 0.05
    # three rejects that all gain cannot show it at 5 % over two candidates (smallest p-value 1/8): all stay
    assert choose(runs, np.r_[np.arange(10), 10, 11, 12])[0] == ALL
    del runs["better"]
    assert choose(runs)[0] == ALL
