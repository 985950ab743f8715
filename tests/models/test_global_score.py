"""The image-level score from pooled teacher features (dmdd.models.global_score), against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from dmdd.checkpoint import restore_model
from dmdd.config import ModelConfig
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.errors import ConfigError
from dmdd.evaluation import fit_map_statistics, fit_teacher_gaussians
from dmdd.models import DMDD
from dmdd.models.gaussian import mahalanobis, precision
from dmdd.models.global_score import FeatureGaussian, ledoit_wolf, pool
from dmdd.training.loop import fit, split_holdout


def ledoit_wolf_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Ledoit & Wolf (2004), Lemma 3.2-3.4, written out term by term with a loop over the samples."""
    n, d = x.shape
    loc = x.mean(axis=0)
    xc = x - loc
    s = sum(np.outer(r, r) for r in xc) / n
    m = np.trace(s) / d
    identity = np.eye(d)
    d2 = np.linalg.norm(s - m * identity, "fro") ** 2
    b2_bar = sum(np.linalg.norm(np.outer(r, r) - s, "fro") ** 2 for r in xc) / n**2
    b2 = min(b2_bar, d2)
    return loc, (b2 / d2) * m * identity + (1 - b2 / d2) * s, b2 / d2


@pytest.mark.parametrize("n,d", [(40, 6), (8, 20)])  # more samples than dimensions, and fewer
def test_ledoit_wolf_matches_the_papers_formula(n, d):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
    loc, cov, a = ledoit_wolf(torch.from_numpy(x))
    ref_loc, ref_cov, ref_a = ledoit_wolf_reference(x)
    assert 0.0 < a <= 1.0 and a == pytest.approx(ref_a, rel=1e-9)
    np.testing.assert_allclose(loc.numpy(), ref_loc, rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), ref_cov, rtol=1e-9, atol=1e-12)
    assert np.linalg.eigvalsh(cov.numpy()).min() > 0  # invertible even with fewer samples than dimensions


def test_pooling_and_distance_match_numpy():
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(3, 4, 5, 6, generator=gen), torch.randn(3, 2, 3, 3, generator=gen)]
    pooled = pool(feats, "mean_std")
    for f, z in zip(feats, pooled):
        a = f.numpy().reshape(3, f.shape[1], -1)
        np.testing.assert_allclose(z.numpy(), np.concatenate([a.mean(-1), a.std(-1)], 1), rtol=1e-5, atol=1e-6)
    assert [z.shape[1] for z in pool(feats, "mean")] == [4, 2]
    g = FeatureGaussian((4, 2), "mean_std")
    train = [torch.randn(30, 4, 5, 6, generator=gen), torch.randn(30, 2, 3, 3, generator=gen)]
    g.fit([z.double() for z in pool(train, "mean_std")])
    expected = np.zeros(3)
    for i, z in enumerate(pooled):
        loc, cov, _ = ledoit_wolf_reference(pool(train, "mean_std")[i].double().numpy())
        for b in range(3):
            diff = z[b].double().numpy() - loc
            expected[b] += np.sqrt(diff @ np.linalg.inv(cov) @ diff)
    np.testing.assert_allclose(g.distance(feats).numpy(), expected, rtol=1e-4)


def test_chosen_stages_alone_are_scored():
    gen = torch.Generator().manual_seed(5)
    train = [torch.randn(25, c, 4, 4, generator=gen) for c in (4, 2, 3)]
    some, last_two = FeatureGaussian((4, 2, 3), "mean", stages=(2, 3)), FeatureGaussian((2, 3), "mean")
    some.fit([z.double() for z in some.pooled(train)])
    last_two.fit([z.double() for z in pool(train[1:], "mean")])
    assert sorted(k for k in some.state_dict() if k.startswith("loc")) == ["loc1", "loc2"]
    test = [torch.randn(3, c, 4, 4, generator=gen) for c in (4, 2, 3)]
    torch.testing.assert_close(some.distance(test), last_two.distance(test[1:]))
    moved = [test[0] * 10 + 5, *test[1:]]  # stage 1 is not scored: changing it changes nothing
    torch.testing.assert_close(some.distance(moved), some.distance(test))
    torch.testing.assert_close(some.score_stats, last_two.score_stats)
    with pytest.raises(ValueError, match="stages"):
        FeatureGaussian((4, 2), "mean", stages=(3,))


def test_score_is_the_map_score_until_fitted_then_the_larger_standardised_score():
    gen = torch.Generator().manual_seed(1)
    g = FeatureGaussian((3,), "mean")
    feats = [torch.randn(4, 3, 2, 2, generator=gen)]
    map_score = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(g.combine(map_score, feats), map_score)  # nothing fitted
    g.fit([torch.randn(20, 3, generator=gen, dtype=torch.float64)])
    assert torch.equal(g.combine(map_score, feats), map_score)  # the Gaussian alone: no statistics yet
    hold_map = torch.tensor([1.0, 1.5, 2.5])
    g.fit_score_stats(hold_map)
    z_map = (map_score - hold_map.mean()) / hold_map.std()
    z_dist = (g.distance(feats) - g.score_stats[2]) / g.score_stats[3]
    torch.testing.assert_close(g.combine(map_score, feats), torch.maximum(z_map, z_dist))
    with pytest.raises(ConfigError, match="global_score"):
        ModelConfig(global_score="max")


def test_a_whole_image_change_raises_the_global_score_more_than_the_map_score(tiny_tree):
    """The case the global score is for: a defect that changes the whole image a little (here its contrast)."""
    cfg = tiny_config(tiny_tree)
    torch.manual_seed(0)
    model = DMDD(cfg.model).eval()
    category = load_category(tiny_tree)
    train, holdout = split_holdout(category.train, 0.25, 0)
    fit_teacher_gaussians(model, train, cfg, torch.device("cpu"))
    fit_map_statistics(model, holdout, cfg, torch.device("cpu"))
    assert model.global_score.fitted == 1
    good = torch.stack([AnomalyDataset(holdout, 64)[i]["image"] for i in range(len(holdout))])
    changed = (0.5 + (good - 0.5) * 0.4).clamp(0, 1)  # lower contrast everywhere
    with torch.no_grad():
        feats_good, feats_changed = (
            model.teacher_features(model.normalize(good)),
            model.teacher_features(model.normalize(changed)),
        )
        assert model.global_score.distance(feats_changed).min() > model.global_score.distance(feats_good).max()
        assert (model(changed).pred_score > model(good).pred_score.max()).all()


def test_training_fits_the_global_score_and_exported_scores_use_it(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "run", progress=False)
    model, payload = restore_model(ckpt)
    g = model.global_score
    assert g is not None and g.gaussian_fitted == 1 and g.fitted == 1
    assert not torch.equal(getattr(g, f"precision{g.stages[0]}"), torch.eye(g.dims[0]))
    images = torch.stack([AnomalyDataset(load_category(tiny_tree).test, 64)[i]["image"] for i in range(4)])
    with torch.no_grad():
        feats = model.features(images)
        map_score = model.map_score(model.fused_map(model.stack(*model.stage_maps(feats), (64, 64)), feats.teacher))
        m_mean, m_std, g_mean, g_std = g.score_stats
        expected = torch.maximum((map_score - m_mean) / m_std, (g.distance(feats.teacher) - g_mean) / g_std)
        torch.testing.assert_close(model(images).pred_score, expected)


def test_statistics_from_preloaded_images_equal_those_from_records(tiny_tree):
    """The engine decodes the held-out images once; the statistics must not change by it."""
    from dmdd.evaluation import preload_images

    cfg = tiny_config(tiny_tree)
    category = load_category(tiny_tree)
    train, holdout = split_holdout(category.train, 0.25, 0)
    results = []
    for source in (holdout, preload_images(holdout, cfg)):
        torch.manual_seed(0)
        model = DMDD(cfg.model).eval()
        fit_teacher_gaussians(model, train, cfg, torch.device("cpu"))
        fit_map_statistics(model, source, cfg, torch.device("cpu"))
        results.append({k: v.clone() for k, v in model.state_dict().items() if k.startswith(("map_", "global_score."))})
    assert results[0].keys() == results[1].keys() and len(results[0]) > 4
    for k, v in results[0].items():
        assert torch.equal(v, results[1][k]), k


def test_distance_is_standardised_over_training_images_scored_out_of_fold():
    rng = np.random.default_rng(3)
    pooled = [rng.normal(size=(23, 4)) * [1, 2, 3, 4] + 1, rng.normal(size=(23, 3))]
    g = FeatureGaussian((4, 3), "mean")
    g.fit([torch.from_numpy(z) for z in pooled], folds=5)
    fold = np.arange(23) % 5
    outside = np.zeros(23)
    for k in range(5):
        for z in pooled:
            loc, cov, _ = ledoit_wolf_reference(z[fold != k])
            inv = np.linalg.inv(cov)
            for j in np.flatnonzero(fold == k):
                outside[j] += np.sqrt((z[j] - loc) @ inv @ (z[j] - loc))
    np.testing.assert_allclose(g.score_stats[2:].numpy(), [outside.mean(), outside.std(ddof=1)], rtol=1e-5)
    inside = g.distance([torch.from_numpy(z).float()[:, :, None, None] for z in pooled]).numpy()
    assert outside.mean() > inside.mean()  # scored out of sample, the training images lie farther out
    assert g.fitted == 0 and g.gaussian_fitted == 1  # the map's statistics come later


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_a_handful_of_training_images_still_gives_finite_scores(n):
    gen = torch.Generator().manual_seed(n)
    g = FeatureGaussian((5, 3), "mean_std")
    feats = lambda b: [torch.randn(b, 5, 4, 4, generator=gen), torch.randn(b, 3, 2, 2, generator=gen)]  # noqa: E731
    g.fit(pool(feats(n), "mean_std"))
    g.fit_score_stats(torch.randn(3, generator=gen))
    assert torch.isfinite(g.score_stats).all() and torch.isfinite(g.combine(torch.zeros(2), feats(2))).all()


def _rank_deficient(rank: int, d: int, scale: float, seed: int) -> np.ndarray:
    """A (d, d) covariance of exact rank ``rank`` built from orthonormal directions, eigenvalues 1..rank times scale."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    values = np.zeros(d)
    values[:rank] = scale * np.arange(1, rank + 1)
    return (q * values) @ q.T, q, values


@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e6])
@pytest.mark.parametrize("nudge", [0.0, 1e-18])  # exactly singular, and singular but for rounding-size noise
def test_precision_of_a_singular_covariance_is_its_pseudo_inverse_on_any_cpu(scale, nudge):
    cov, q, values = _rank_deficient(3, 12, scale, seed=5)
    cov = cov + nudge * scale * np.eye(12)
    got = precision(torch.from_numpy(cov)).numpy()
    # reference: invert the three known eigenvalues along their known directions, nothing else
    expected = (q[:, :3] / values[:3]) @ q[:, :3].T
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9 / scale)
    assert np.isfinite(got).all()


def test_precision_of_a_well_conditioned_covariance_is_its_inverse():
    a = np.random.default_rng(2).normal(size=(30, 8))
    cov = a.T @ a / 30
    np.testing.assert_allclose(precision(torch.from_numpy(cov)).numpy(), np.linalg.inv(cov), rtol=1e-9)


def test_precision_of_a_zero_covariance_is_zero():
    assert torch.equal(precision(torch.zeros(4, 4, dtype=torch.float64)), torch.zeros(4, 4, dtype=torch.float64))


def test_two_training_images_score_along_their_difference_only():
    # two images: Ledoit-Wolf's shrinkage is 0 and the covariance has rank 1; the precision must not blow up
    z = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    loc, cov, a = ledoit_wolf(z)
    assert a == 0.0
    prec = precision(cov)
    # variance 1 along x, none elsewhere: a point 3 out along x is 3 away, a point off that line is not penalised
    d = mahalanobis(torch.tensor([[4.0, 0.0, 0.0], [1.0, 5.0, 0.0]], dtype=torch.float64), loc, prec)
    np.testing.assert_allclose(d.numpy(), [3.0, 0.0], atol=1e-9)
