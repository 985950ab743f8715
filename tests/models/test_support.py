"""The foreground support (dmdd.models.support): where no good training part ever was, the anomaly map is damped."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy import ndimage

from dmdd.checkpoint import load_checkpoint, restore_model, save_checkpoint
from dmdd.config import Config, ConfigError
from dmdd.models.support import ForegroundSupport, support_map
from dmdd.training.loop import fit


def discs(centres: list[tuple[int, int]], size: int = 64, radius: int = 8) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.stack([(yy - y) ** 2 + (xx - x) ** 2 <= radius**2 for y, x in centres])


def test_the_support_covers_every_training_foreground_and_fades_away_from_them():
    masks = discs([(20, 20), (24, 30), (40, 22)])  # one object, three positions
    prior = support_map(masks)
    grow = 64 // 32  # the dilation radius at 64 px
    union = masks.any(0)
    distance = ndimage.distance_transform_edt(~union)  # pixels from the nearest foreground pixel of any image
    assert prior.shape == (64, 64) and prior.dtype == np.float32
    assert prior[union].min() > 0.95  # wherever some good part was
    assert prior[distance > 3 * grow].max() < 0.01  # well away from every one of them
    assert (prior[distance <= grow / 2] > 0.5).all()  # inside the dilation margin
    # an object seen everywhere leaves the map as it is
    assert np.allclose(support_map(np.ones((2, 64, 64), bool)), 1.0)


def test_the_map_is_multiplied_by_the_support_at_any_size():
    support = ForegroundSupport(64)
    with pytest.raises(ValueError, match=r"\(N, 64, 64\)"):
        support.fit(discs([(32, 32)], size=32))
    support.fit(discs([(32, 32)]))
    assert support.fitted == 1 and 0 < support.coverage < 0.2
    m = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(support(m), m * support.prior)
    small = support(m[..., ::2, ::2].contiguous())
    assert small.shape == (2, 1, 32, 32) and small[..., 0, 0].abs().max() < 1e-6  # corner: far from the object


def test_auto_fits_it_for_objects_and_the_model_uses_it(tiny_tree, tmp_path):
    cfg = tiny_config(tiny_tree).replace(synthesis={"foreground": "object"})
    ckpt = fit(cfg, tmp_path / "object", progress=False)
    payload = load_checkpoint(ckpt)
    assert payload["config"]["model"]["foreground_support"] == "on"
    model, _ = restore_model(ckpt)
    assert model.support is not None and model.support.fitted == 1
    assert fit(cfg, tmp_path / "object", resume=True, progress=False) == ckpt  # "auto" resumes "on"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(images)
        feats = model.features(images)
        plain = model.smooth(model.stack(*model.stage_maps(feats), (64, 64)).sum(1, keepdim=True))
    torch.testing.assert_close(out.anomaly_map, plain * model.support.prior)


def test_textures_tiles_and_old_checkpoints_go_without_it(tiny_tree, tmp_path):
    ckpt = fit(tiny_config(tiny_tree).replace(synthesis={"foreground": "texture"}), tmp_path / "t", progress=False)
    payload = load_checkpoint(ckpt)
    assert payload["config"]["model"]["foreground_support"] == "off" and restore_model(ckpt)[0].support is None
    object_tiles = tiny_config(tiny_tree).replace(synthesis={"foreground": "object"}, model={"tile": 32})
    tiled = load_checkpoint(fit(object_tiles, tmp_path / "tiles", progress=False))
    assert tiled["config"]["model"]["foreground_support"] == "off"
    with pytest.raises(ConfigError, match="needs an object"):
        fit(tiny_config(tiny_tree).replace(synthesis={"foreground": "texture"}, model={"foreground_support": "on"}),
            tmp_path / "bad", progress=False)  # fmt: skip
    assert not (tmp_path / "bad" / "last.pt").exists()
    with pytest.raises(ConfigError, match="whole images"):
        Config().replace(model={"foreground_support": "on", "tile": 64})
    with pytest.raises(ConfigError, match="foreground_support"):
        Config().replace(model={"foreground_support": "yes"})
    del payload["config"]["model"]["foreground_support"]  # as written before the option existed
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in payload.items() if not k.startswith("format")})
    assert restore_model(tmp_path / "old.pt")[0].support is None


def test_an_object_model_with_the_support_exports_to_onnx_with_the_same_maps(tiny_tree, tmp_path):
    pytest.importorskip("onnxruntime")
    from dmdd.deploy.export import export_onnx

    cfg = tiny_config(tiny_tree).replace(synthesis={"foreground": "object"})
    model, _ = restore_model(fit(cfg, tmp_path / "object", progress=False))
    report = export_onnx(model, tmp_path / "m.onnx")  # raises when the maps differ by more than 1e-4 of their scale
    assert report["max_abs_diff"] < 1e-4
