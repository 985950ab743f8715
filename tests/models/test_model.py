import dataclasses

import pytest
import torch
from torch.nn import functional as F

from dmdd.config import Config, ModelConfig
from dmdd.errors import ConfigError
from dmdd.models import DMDD, InferenceOutput, SegmentationOutput
from dmdd.models.losses import segmentation_loss
from dmdd.training.loop import build_optimizers
from dmdd.training.objective import student_loss

BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50",
             "wide_resnet50_2"]  # fmt: skip


def make(**kw) -> DMDD:
    torch.manual_seed(0)
    base = dict(backbone="efficientnet_lite0", image_size=64, msn=True)  # the MSN is opt-in; most tests cover it
    return DMDD(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_of_every_intermediate(name):
    model = make(backbone=name, pretrained=name.startswith("efficientnet")).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.features(x)
        for branch in (feats.teacher, feats.normality, feats.abnormality):
            for f, c, s in zip(branch, model.channels, (4, 8, 16, 32)):
                assert f.shape == (2, c, 64 // s, 64 // s) and torch.isfinite(f).all()
        ngm, aim = model.stage_maps(feats)
        assert [m.shape[-1] for m in ngm + aim] == [16, 8, 4, 2] * 2
        assert model.stacked_maps(x).shape == (2, 8, 64, 64)
        out = model(x)
    assert isinstance(out, InferenceOutput)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 1, 64, 64)
    assert torch.isfinite(out.anomaly_map).all() and ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()


def test_teacher_is_frozen_and_always_in_eval_mode():
    model = make()
    model.train()
    assert not model.teacher.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    bn = [m for m in model.student.stages.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and not any(m.training for m in bn)  # student BN statistics frozen (config default)
    assert model.pmn_normality.training


def test_optimizer_step_changes_student_side_and_msn_but_not_teacher():
    model = make()
    cfg = Config().replace(model={"backbone": "efficientnet_lite0", "image_size": 64})
    student_opt, seg_opt = build_optimizers(model, cfg)
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = [p.clone() for p in model.student.parameters()]
    pmn_before = [p.clone() for p in model.pmn_abnormality.parameters()]
    seg_before = [p.clone() for p in model.segmentation.parameters()]
    normal, anomalous = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) > 0.7).float()
    loss, _, _ = student_loss(model, normal, anomalous, mask, cfg)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    student_opt.step()
    model.eval()
    model.segmentation.train()
    out = model(torch.cat([normal, anomalous]))
    assert isinstance(out, SegmentationOutput)
    segmentation_loss(out.logits, out.pred_score, torch.cat([torch.zeros_like(mask), mask])).backward()
    seg_opt.step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(student_before, model.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(pmn_before, model.pmn_abnormality.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(seg_before, model.segmentation.parameters()))


@pytest.mark.parametrize("pmn", [False, True])
def test_student_equals_teacher_at_initialisation(pmn):
    model = make(pmn_inner=pmn, pmn_outer=pmn).eval()
    with torch.no_grad():
        ngm, aim = model.stage_maps(model.features(torch.rand(3, 3, 64, 64)))
    for m in ngm + aim:
        assert m.abs().max() < 1e-5


ABLATIONS = [
    dict(branches="normality"), dict(branches="abnormality"), dict(pmn_inner=False), dict(pmn_outer=False),
    dict(pmn_inner=False, pmn_outer=False), dict(msn=False), dict(pyramid_upsampling=False),
    dict(multi_perception=False), dict(branches="abnormality", msn=False),
]  # fmt: skip


@pytest.mark.parametrize("ablation", ABLATIONS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_ablation_builds_and_runs_forward_backward(ablation):
    model = make(**ablation)
    cfg = Config(model=dataclasses.replace(ModelConfig(backbone="efficientnet_lite0", image_size=64), **ablation))
    normal, anomalous = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) > 0.7).float()
    loss, ngm, aim = student_loss(model, normal, anomalous, mask, cfg)
    loss.backward()
    assert torch.isfinite(loss)
    assert (float(ngm.detach()) == 0) == (ablation.get("branches") == "abnormality")
    assert (float(aim.detach()) == 0) == (ablation.get("branches") == "normality")
    if model.segmentation is not None:
        model.eval()
        model.segmentation.train()
        out = model(torch.cat([normal, anomalous]))
        segmentation_loss(out.logits, out.pred_score, torch.cat([torch.zeros_like(mask), mask])).backward()
    model.eval()
    with torch.no_grad():
        out = model(normal)
    assert out.anomaly_map.shape == (2, 1, 64, 64) and torch.isfinite(out.pred_score).all()


def test_without_msn_map_is_plain_sum_and_score_is_its_top_k_mean_or_max():
    model = make(msn=False, map_sigma=0.0, top_k=5).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        stacked = model.stacked_maps(x)
    assert torch.allclose(out.anomaly_map, stacked.sum(1, keepdim=True))
    flat = out.anomaly_map.flatten(1)
    by_sorting = torch.stack([row.sort(descending=True).values[:5].mean() for row in flat])
    assert torch.allclose(out.pred_score, by_sorting)
    assert (out.pred_score < flat.amax(1)).all()
    model.cfg = dataclasses.replace(model.cfg, image_score="max")
    with torch.no_grad():
        assert torch.allclose(model(x).pred_score, flat.amax(1))
    with pytest.raises(ConfigError, match="image_score"):
        ModelConfig(image_score="mean")


def test_residual_msn_starts_as_a_monotone_function_of_the_plain_sum():
    """At initialisation the MSN's map ranks pixels exactly like the (normalised) plain sum of the maps."""
    model = make(map_sigma=0.0).eval()
    model.map_mean.copy_(torch.rand(8))
    model.map_std.copy_(torch.rand(8) + 0.5)
    stacked = torch.randn(2, 8, 64, 64)
    with torch.no_grad():
        logits = model.segmentation(stacked)
    expected = 2.0 * stacked.mean(1, keepdim=True) - 5.0  # weight 2, bias -5, correction 0
    assert torch.allclose(logits, expected, atol=1e-5)
    paper = make(msn_residual=False, map_sigma=0.0).eval()
    with torch.no_grad():
        assert not torch.allclose(paper.segmentation(stacked), expected, atol=1e-2)


def test_map_normalisation_standardises_each_map():
    model = make(msn=False, map_sigma=0.0).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        raw = model.stacked_maps(x, normalized=False)
        model.map_mean.copy_(raw.mean(dim=(0, 2, 3)))
        model.map_std.copy_(raw.std(dim=(0, 2, 3), unbiased=False))
        z = model.stacked_maps(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(z.shape[1]), atol=1e-4)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(z.shape[1]), atol=1e-3)


def test_low_resolution_global_attention_is_upsampled():
    model = make(global_attention_size=4)
    assert model.segmentation.global_attention.shape == (8, 4, 4)
    full = make(global_attention_size=0)
    assert full.segmentation.global_attention.shape == (8, 64, 64)


def test_gaussian_blur_matches_an_independent_reference():
    from scipy.ndimage import gaussian_filter

    from dmdd.models.segmentation import gaussian_blur

    x = torch.rand(2, 1, 40, 48, dtype=torch.float64)
    ours = gaussian_blur(x, 2.0).numpy()
    for i in range(2):
        ref = gaussian_filter(x[i, 0].numpy(), sigma=2.0, mode="nearest", truncate=4.0)
        assert abs(ours[i, 0] - ref).max() < 1e-6
    assert torch.allclose(gaussian_blur(torch.ones(1, 1, 20, 20), 3.0), torch.ones(1, 1, 20, 20), atol=1e-6)


def test_map_stages_select_the_fused_maps():
    model = make(map_stages=[3, 2], map_sigma=0.0).eval()
    assert model.cfg.map_stages == (2, 3) and model.num_maps == 4
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ngm, aim = model.stage_maps(model.features(x))
        stacked = model.stacked_maps(x)
        out = model(x)
    assert stacked.shape == (2, 4, 64, 64) and out.anomaly_map.shape == (2, 1, 64, 64)
    plain = make(map_stages=[3], msn=False, map_sigma=0.0).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(("segmentation", "map_"))},
                          strict=False)  # fmt: skip
    with torch.no_grad():
        expected = sum(F.interpolate(m[2], size=(64, 64), mode="bilinear") for m in (ngm, aim))
        assert torch.allclose(plain(x).anomaly_map, expected, atol=1e-6)
    with pytest.raises(ConfigError):
        ModelConfig(map_stages=[0, 5])


def test_fused_stages_add_up_only_their_maps_of_both_branches():
    model = make(msn=False, map_sigma=0.0, fused_stages=[3, 1, 2]).eval()
    assert model.cfg.fused_stages == (1, 2, 3) and model.fused == [0, 1, 2, 4, 5, 6]  # NGM s1-s4, then AIM s1-s4
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        stacked = model.stacked_maps(x)
        out = model(x)
    assert stacked.shape[1] == 8  # every map is still computed and standardised
    expected = stacked.sum(1, keepdim=True) - stacked[:, [3, 7]].sum(1, keepdim=True)
    assert torch.allclose(out.anomaly_map, expected, atol=1e-5)
    assert make(msn=False, fused_stages=[1, 2, 3, 4]).fused is None  # all of map_stages: the plain sum, unchanged
    assert make(msn=False, branches="abnormality", fused_stages=[4]).fused == [3]
    with pytest.raises(ConfigError, match="subset of model.map_stages"):
        ModelConfig(map_stages=[2, 3], fused_stages=[1])
    with pytest.raises(ConfigError, match="needs model.msn: false"):
        ModelConfig(msn=True, fused_stages=[1, 2])
