"""The regional texture-statistics map: window statistics and distances against written-out references, the
combination with the model's map, and the engine's choice by foreground policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from dmdd.checkpoint import config_of, load_checkpoint, restore_model, save_checkpoint
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.models import regional
from dmdd.models.dmdd import DMDD
from dmdd.models.regional import RegionalGaussian, k_centres, local_stats
from dmdd.training.loop import fit, split_holdout


def test_window_statistics_match_a_loop_over_windows_cut_at_the_border():
    f = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    got = local_stats(f, 3).numpy()
    a = f.numpy()
    for b in range(2):
        for y in range(6):
            for x in range(5):
                window = a[b, :, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].reshape(3, -1)
                np.testing.assert_allclose(got[b, :3, y, x], window.mean(1), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got[b, 3:, y, x], window.std(1), rtol=1e-4, atol=1e-5)


def test_map_is_the_mahalanobis_distance_of_every_window_summed_over_stages():
    gen = torch.Generator().manual_seed(1)
    channels = (2, 3, 4, 5)
    g = RegionalGaussian(channels, windows={2: 3, 3: 1})
    train = [torch.randn(6, c, 8 >> i, 8 >> i, generator=gen) for i, c in enumerate(channels)]
    shrinkage = g.fit({s: v.flatten(0, 1) for s, v in g.window_vectors(train).items()})
    assert set(shrinkage) == {2, 3} and g.gaussian_fitted == 1
    test = [torch.randn(1, c, 8 >> i, 8 >> i, generator=gen) for i, c in enumerate(channels)]
    got = g.raw_map(test, (4, 4))[0, 0].numpy()  # stage 2 is 4 x 4: no resampling there
    stage2 = local_stats(test[1], 3)[0].numpy().reshape(6, -1).T
    loc, precision = g.loc2.numpy(), g.precision2.numpy()
    expected2 = np.sqrt([(v - loc) @ precision @ (v - loc) for v in stage2]).reshape(4, 4)
    stage3 = torch.nn.functional.interpolate(
        torch.from_numpy(
            np.sqrt(
                [
                    (v - g.loc3.numpy()) @ g.precision3.numpy() @ (v - g.loc3.numpy())
                    for v in local_stats(test[2], 1)[0].numpy().reshape(8, -1).T
                ]
            ).reshape(1, 1, 2, 2)
        ).float(),
        size=(4, 4),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    np.testing.assert_allclose(got, expected2 + stage3, rtol=1e-4, atol=1e-4)


def test_k_centres_match_a_brute_force_farthest_point_loop_and_small_sets_are_kept_whole():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2))
    a = x.numpy().astype(np.float64)
    picks = [int(np.argmin(np.linalg.norm(a - a.mean(0), axis=1)))]
    while len(picks) < 6:
        nearest = np.min([np.linalg.norm(a - a[p], axis=1) for p in picks], axis=0)
        picks.append(int(np.argmax(nearest)))
    torch.testing.assert_close(k_centres(x, 6), x[picks])
    assert torch.equal(k_centres(x[:4], 6), x[[0, 1, 2, 3, 0, 1]])  # fewer rows than asked: each kept, repeated


@pytest.mark.parametrize("chunk", [1024, 2])  # the whole bank at once, and in chunks of 2, 2 and 1 windows
def test_with_a_bank_the_map_is_the_mahalanobis_distance_to_the_nearest_kept_training_window(chunk, monkeypatch):
    monkeypatch.setattr(regional, "BANK_CHUNK", chunk)
    gen = torch.Generator().manual_seed(3)
    channels = (2, 3, 4, 5)
    g = RegionalGaussian(channels, windows={2: 3}, bank=5)
    train = [torch.randn(4, c, 8 >> i, 8 >> i, generator=gen) for i, c in enumerate(channels)]
    vectors = g.window_vectors(train)[2].flatten(0, 1)  # 64 training windows of 6 statistics
    g.fit({2: vectors})
    loc, precision = g.loc2.double().numpy(), g.precision2.double().numpy()
    # every kept window is a training window, whitened: find which, then measure in the original space
    whitened = (vectors - g.loc2) @ g.whiten2
    kept = [int(torch.cdist(row[None], whitened).argmin()) for row in g.bank2]
    assert len(set(kept)) == 5 and torch.cdist(g.bank2, whitened[kept]).diagonal().max() < 1e-4
    train_kept = vectors[kept].double().numpy()
    test = [torch.randn(2, c, 8 >> i, 8 >> i, generator=gen) for i, c in enumerate(channels)]
    got = g.raw_map(test, (4, 4)).numpy()
    windows = local_stats(test[1], 3).double().numpy().reshape(2, 6, -1).transpose(0, 2, 1)
    expected = np.array([[min(np.sqrt((v - u) @ precision @ (v - u)) for u in train_kept) for v in image]
                         for image in windows]).reshape(2, 1, 4, 4)  # fmt: skip
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert not np.allclose(expected, np.sqrt([[(v - loc) @ precision @ (v - loc) for v in image] for image in windows])
                           .reshape(2, 1, 4, 4), atol=1e-2)  # not the distance to the mean  # fmt: skip


def test_combination_is_the_model_map_until_fitted_then_the_sum_of_standardised_maps():
    g = RegionalGaussian((2, 3, 4, 5))
    model_map, regional = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8) * 10
    assert torch.equal(g.combine(model_map, regional), model_map)
    g.fit_pixel_stats((0.5, 0.25), (5.0, 2.0))
    torch.testing.assert_close(g.combine(model_map, regional), (model_map - 0.5) / 0.25 + (regional - 5.0) / 2.0)


def test_training_on_a_texture_fits_it_and_a_patch_of_other_statistics_stands_out(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "run", progress=False)
    model, payload = restore_model(ckpt)
    assert config_of(payload).model.regional_score == "on"  # "auto" resolved: the tiny metal set is a texture
    assert model.regional.gaussian_fitted == 1 and model.regional.fitted == 1
    _, holdout = split_holdout(load_category(tiny_tree).train, 0.25, 0)
    good = torch.stack([AnomalyDataset(holdout, 64)[i]["image"] for i in range(len(holdout))])
    changed = good.clone()
    patch = changed[:, :, 16:48, 16:48]
    changed[:, :, 16:48, 16:48] = patch.mean() + (patch - patch.mean()) * 0.2  # the same mean, a fifth the contrast
    with torch.no_grad():
        g = model.regional
        before = g.raw_map(model.teacher_features(model.normalize(good)), (64, 64))
        after = g.raw_map(model.teacher_features(model.normalize(changed)), (64, 64))
    assert (after[:, :, 28:36, 28:36].amin(dim=(1, 2, 3)) > before.amax(dim=(1, 2, 3))).all()
    with torch.no_grad():  # one smoothing of the standardised sum = the sum of the two smoothed, standardised maps
        feats = model.features(good)
        stacked = model.stack(*model.stage_maps(feats), (64, 64))
        separately = g.combine(model.fused_map(stacked), model.smooth(g.raw_map(feats.teacher, (64, 64))))
        torch.testing.assert_close(model.fused_map(stacked, feats.teacher), separately, rtol=1e-4, atol=1e-3)


def test_auto_leaves_it_out_for_objects_and_old_checkpoints_load_without_it(tiny_tree, tmp_path):
    cfg = tiny_config(tiny_tree).replace(synthesis={"foreground": "object"})
    payload = load_checkpoint(fit(cfg, tmp_path / "object", progress=False))
    assert (
        payload["config"]["model"]["regional_score"] == "off"
        and restore_model(tmp_path / "object" / "last.pt")[0].regional is None
    )
    ckpt = fit(tiny_config(tiny_tree), tmp_path / "texture", progress=False)
    payload = load_checkpoint(ckpt)
    assert fit(tiny_config(tiny_tree), tmp_path / "texture", resume=True, progress=False) == ckpt  # "auto" resumes "on"
    del payload["config"]["model"]["regional_score"]  # as written before the option existed
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("regional.")}
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    assert restore_model(tmp_path / "old.pt")[0].regional is None
    payload = load_checkpoint(ckpt)  # a texture checkpoint written before the bank: the distance to the mean
    del payload["config"]["model"]["regional_bank"]
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith(("regional.bank", "regional.whiten"))}
    save_checkpoint(tmp_path / "before_bank.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    model, old = restore_model(tmp_path / "before_bank.pt")
    assert config_of(old).model.regional_bank == 0 and model.regional.bank == 0 and model.regional.gaussian_fitted == 1


def test_an_unknown_value_is_a_config_error():
    from dmdd.config import Config, ConfigError

    with pytest.raises(ConfigError, match="regional_score"):
        Config().replace(model={"regional_score": "yes"})


def test_both_teacher_gaussians_come_from_one_pass_equal_to_fitting_each_alone(tiny_tree):
    """The engine fits the global and the regional Gaussians in one pass over the training images (each image
    decoded and seen by the teacher once); the result is the same, to the bit, as two passes fitting one each."""
    from dmdd.evaluation import fit_teacher_gaussians

    cfg = tiny_config(tiny_tree).replace(model={"regional_score": "on"})
    train, _ = split_holdout(load_category(tiny_tree).train, 0.25, 0)
    torch.manual_seed(0)
    together, alone = DMDD(cfg.model).eval(), DMDD(cfg.model).eval()
    alone.load_state_dict(together.state_dict())
    seen = []
    real = together.teacher_features
    together.teacher_features = lambda x: seen.append(len(x)) or real(x)
    fitted = fit_teacher_gaussians(together, train, cfg, torch.device("cpu"))
    assert set(fitted) == {"global", "regional"} and sum(seen) == len(train)  # every image once
    assert fit_teacher_gaussians(alone, train, cfg, torch.device("cpu"), regional=False).keys() == {"global"}
    assert alone.regional.gaussian_fitted == 0
    assert fit_teacher_gaussians(alone, train, cfg, torch.device("cpu"), global_score=False).keys() == {"regional"}
    state = together.state_dict()
    fitted_keys = [k for k in state if k.startswith(("global_score.", "regional."))]
    assert len(fitted_keys) > 6
    for k in fitted_keys:
        assert torch.equal(state[k], alone.state_dict()[k]), k
