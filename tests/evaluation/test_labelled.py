"""Thresholds from labelled images (dmdd calibrate) and from good images alone: each rule against a brute-force
search, the false-alarm promises checked by simulation, the refusals, and the cross-validated estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dmdd.errors import DmddError
from dmdd.evaluation.labelled import (
    check_rule,
    cross_validated,
    describe,
    parse_rule,
    rule_threshold,
    wilson,
    with_labelled,
    without_labelled,
)
from dmdd.evaluation.thresholds import best_detection_at, normal_threshold, normal_threshold_method


def brute_force(good, bad, rule, rate):
    """Try every candidate threshold (each score and just above it) and apply the rule's criterion directly."""
    scores = np.r_[good, bad]
    candidates = sorted(set(scores) | {np.nextafter(s, np.inf) for s in scores})
    best = None
    for t in candidates:
        tp, fp = int((bad >= t).sum()), int((good >= t).sum())
        if rule == "f1":
            key = (2 * tp / (len(bad) + tp + fp), t)
        else:  # at most k - 1 good images at or above t, k = floor(rate (n + 1)); then most rejects, lowest t
            if fp > math.floor(rate * (len(good) + 1) + 1e-9) - 1:
                continue
            key = (tp, -t)
        if best is None or key > best[0]:
            best = (key, t)
    return best[1]


@pytest.mark.parametrize("seed", range(6))
def test_rule_thresholds_make_the_brute_force_decisions(seed):
    rng = np.random.default_rng(seed)
    good = np.round(rng.normal(0, 1, 19), 1)  # rounded: ties between and within the classes
    bad = np.round(rng.normal(1.5, 1, 9), 1)
    for rule, rate in [("f1", None), ("fpr", 0.05), ("fpr", 0.1), ("recall-at-fpr", 0.1), ("recall-at-fpr", 0.2)]:
        t = rule_threshold(good, bad, rule, rate)
        ref = brute_force(good, bad, "f1" if rule == "f1" else "fpr", rate)
        f1 = lambda th: 2 * (bad >= th).sum() / (len(bad) + (bad >= th).sum() + (good >= th).sum())  # noqa: E731
        if rule == "f1":  # the same best F1 (several thresholds may reach it)
            assert f1(t) == pytest.approx(f1(ref)), (t, ref)
        elif rule == "fpr":  # the same decisions on every labelled image
            assert np.array_equal(np.r_[good, bad] >= t, np.r_[good, bad] >= ref), (rule, rate, t, ref)
        else:  # the same rejects caught, no more false alarms than allowed, the threshold inside the gap
            assert np.array_equal(bad >= t, bad >= ref) and (good >= t).sum() <= (good >= ref).sum()
            assert ref <= t <= bad[bad >= ref].min() if (bad >= ref).any() else t >= ref


def test_fpr_rule_keeps_its_promise_on_new_good_images():
    """fpr=X promises an expected false-alarm rate of at most X on new good parts, whatever their distribution:
    simulated with 19 labelled good images (k = 2) from a skewed distribution, the mean is 2/20 = 0.1."""
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(4000):
        good = rng.lognormal(0, 1, 19)
        t = rule_threshold(good, np.array([100.0]), "fpr", 0.1)
        rates.append(stats.lognorm.sf(t, 1))  # the exact chance that a new good image lies above t
    assert np.mean(rates) == pytest.approx(0.1, abs=0.006)


def test_recall_at_fpr_sits_half_way_in_the_gap():
    good, bad = np.array([0.0, 1.0, 2.0, 2.5]), np.array([4.0, 5.0])
    assert rule_threshold(good, bad, "recall-at-fpr", 0.2) == 3.25  # 4 good: k = 1, above the highest
    assert rule_threshold(good, bad, "fpr", 0.2) == np.nextafter(2.5, np.inf)
    assert rule_threshold(good, bad, "fpr", 0.4) == np.nextafter(2.0, np.inf)  # k = 2: one good may lie above


@pytest.mark.parametrize("text", ["f2", "fpr", "fpr=abc", "fpr=1.5", "fpr=0", "f1=0.2"])
def test_bad_rules_are_refused_naming_the_rule(text):
    with pytest.raises(DmddError, match="rule"):
        parse_rule(text)


@pytest.mark.parametrize(
    "good, bad, rule, message",
    [(0, 5, "f1", "no good image"), (5, 0, "f1", "no defective image"), (1, 1, "f1", "at least 3"),
     (10, 10, "fpr=0.01", "give at least 99 good images"), (8, 3, "recall-at-fpr=0.1", "at least 9")],  # fmt: skip
)
def test_rules_the_images_cannot_support_are_refused(good, bad, rule, message):
    name, rate = parse_rule(rule)
    with pytest.raises(DmddError, match=message):
        check_rule(good, bad, name, rate)


def test_wilson_interval_solves_its_equation():
    lo, hi = wilson(8, 10)
    for p in (lo, hi):  # the ends solve |p - k/n| = z sqrt(p (1 - p) / n)
        assert abs(abs(p - 0.8) - 1.96 * math.sqrt(p * (1 - p) / 10)) < 1e-12
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)


def test_leave_one_out_decides_each_image_by_a_threshold_set_without_it():
    scores = np.array([0.0, 1.0, 2.0, 10.0, 0.5, 1.5, 3.0, 11.0, 2.2, 2.4])
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    for rule, rate in [("f1", None), ("fpr", 0.25)]:
        est = cross_validated(scores, labels, rule, rate)
        flagged = []
        for i in range(scores.size):
            rest = np.delete(np.arange(scores.size), i)
            t = rule_threshold(scores[rest][labels[rest] == 0], scores[rest][labels[rest] == 1], rule, rate)
            flagged.append(scores[i] >= t)
        flagged = np.array(flagged)
        assert est["recall"] == flagged[labels == 1].mean() and est["false_alarm_rate"] == flagged[labels == 0].mean()
        assert est["method"] == "leave-one-out"
        lo, hi = est["recall_95ci"]
        assert lo <= est["recall"] <= hi


def test_ten_fold_over_sixty_images_keeps_both_classes_in_every_fold():
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(50, int), np.ones(30, int)]
    scores = rng.normal(labels * 2.0, 1.0)
    est = cross_validated(scores, labels, "f1", None)
    assert est["method"] == "10-fold" and 0.5 < est["recall"] <= 1 and 0 <= est["false_alarm_rate"] < 0.5


def test_normal_threshold_is_the_conformal_quantile_when_the_sample_allows_it():
    scores = np.arange(1000, dtype=np.float64)
    t, method = normal_threshold_method(scores, 0.01)
    assert method == "quantile" and (scores >= t).sum() == 9 and 990 < t <= 991  # k = floor(0.01 * 1001) = 10
    assert normal_threshold(scores[:99], 0.01) == np.nextafter(98.0, np.inf)  # 99 images: just above the maximum


def test_normal_threshold_fits_a_tail_when_the_holdout_is_too_small():
    """Five good scores cannot set a 1 % rate by a quantile (above their maximum a new one still lies with
    probability 1/6); the fitted tail keeps the promise for normal scores: checked with the exact tail chance."""
    rng = np.random.default_rng(0)
    tail, above_max = [], []
    for _ in range(3000):
        sample = rng.normal(0, 1, 5)
        t, method = normal_threshold_method(sample, 0.05)
        assert method == "tail" and t > sample.max()
        tail.append(stats.norm.sf(t))
        above_max.append(stats.norm.sf(sample.max()))
    assert np.mean(tail) == pytest.approx(0.05, abs=0.005)
    assert np.mean(above_max) == pytest.approx(1 / 6, abs=0.01)
    assert normal_threshold_method(np.array([1.0, 2.0]), 0.01) == (np.nextafter(2.0, np.inf), "max")


def test_best_detection_at_a_false_alarm_rate_by_brute_force():
    rng = np.random.default_rng(3)
    good, bad = np.round(rng.normal(0, 1, 25), 1), np.round(rng.normal(1, 1, 30), 1)
    for fa in (0.0, 0.04, 0.08, 0.2, 1.0):
        brute = max((bad >= t).mean() for t in np.r_[good, bad, np.inf] if (good >= t).mean() <= fa + 1e-12)
        assert best_detection_at(good, bad, fa) == pytest.approx(brute)


def test_labelled_thresholds_keep_trainings_beside_them_and_reset_goes_back():
    trained = {"image": 1.0, "pixel": 2.0, "mode": "normal", "normal": {"target_fpr": 0.01}, "normal_images": 21}
    labelled = {"rule": "f1", "image": 0.5, "pixel": None, "good_images": 10, "defective_images": 10,
                "date": "2026-12-06T00:00:00+00:00"}  # fmt: skip
    both = with_labelled(trained, labelled)
    assert both["image"] == 0.5 and both["pixel"] == 2.0 and both["mode"] == "labelled"
    assert describe(both) == "labelled: rule f1 on 10 good + 10 defective images (2026-12-06)"
    again = with_labelled(both, {**labelled, "image": 0.7, "pixel": 3.0})
    assert again["image"] == 0.7 and again["pixel"] == 3.0 and again["unlabelled"]["image"] == 1.0
    back = without_labelled(again, "x.pt")
    assert {k: back[k] for k in ("image", "pixel", "mode")} == {"image": 1.0, "pixel": 2.0, "mode": "normal"}
    assert "labelled" not in back and describe(back).startswith("normal: 1 % false-alarm target on 21")
    with pytest.raises(DmddError, match="no labelled thresholds"):
        without_labelled(back, "x.pt")


def test_held_out_good_images_join_the_labelled_ones_unless_those_score_higher():
    """The pooling decision is a one-sided Mann-Whitney test, checked against an exact count of the pairs: with 8 vs
    12 untied scores the U statistic is the number of (labelled, held-out) pairs where the labelled one is higher."""
    from dmdd.evaluation.labelled import POOL_ALPHA, pool_held_out

    rng = np.random.default_rng(4)
    held = rng.normal(0.0, 1.0, 12)
    same, shifted = rng.normal(0.0, 1.0, 8), rng.normal(3.0, 1.0, 8)
    for labelled, expect in ((same, True), (shifted, False)):
        pool = pool_held_out(labelled, held, "fpr")
        u = sum(int(a > b) for a in labelled for b in held)
        exact = stats.mannwhitneyu(labelled, held, alternative="greater", method="exact")
        assert exact.statistic == u and abs(pool["p_value"] - exact.pvalue) < 1e-12
        assert pool["pooled"] is expect and (pool["p_value"] >= POOL_ALPHA) is expect and pool["count"] == 12
    assert pool_held_out(same, held, "f1") is None and pool_held_out(same, None, "fpr") is None


def test_pooled_held_out_images_set_the_false_alarm_rules_and_every_fold_of_the_estimate():
    from dmdd.evaluation.labelled import labelled_thresholds

    rng = np.random.default_rng(5)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    scores = np.r_[rng.normal(0, 1, 10), rng.normal(3, 1, 10)]
    held = rng.normal(0, 1, 50)
    with pytest.raises(DmddError, match="cannot be met with 10 good"):  # 10 good images alone cannot promise 5 %
        labelled_thresholds(scores, labels, "fpr=0.05")
    out = labelled_thresholds(scores, labels, "fpr=0.05", held_out=held)
    assert out["held_out_good"]["pooled"] and out["held_out_good"]["count"] == 50
    pooled = np.r_[scores[labels == 0], held]
    assert out["image"] == brute_force(pooled, scores[labels == 1], "fpr", 0.05)
    flagged = []  # leave-one-out: every fold keeps all 50 held-out scores
    for i in range(scores.size):
        rest = np.delete(np.arange(scores.size), i)
        good = np.r_[scores[rest][labels[rest] == 0], held]
        flagged.append(scores[i] >= rule_threshold(good, scores[rest][labels[rest] == 1], "fpr", 0.05))
    flagged = np.array(flagged)
    assert out["estimate"]["recall"] == flagged[labels == 1].mean()
    assert out["estimate"]["false_alarm_rate"] == flagged[labels == 0].mean()
    # held-out images that score far lower (parts changed since training) are left out; f1 never pools
    assert not labelled_thresholds(scores, labels, "fpr=0.1", held_out=held - 5)["held_out_good"]["pooled"]
    f1 = labelled_thresholds(scores, labels, "f1", held_out=held)
    assert f1["held_out_good"] is None and f1["image"] == brute_force(scores[labels == 0], scores[labels == 1], "f1", None)
