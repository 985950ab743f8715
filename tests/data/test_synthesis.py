"""Foreground-aware Anomaly Synthesis: determinism, blend/mask alignment, foreground restriction, caching."""

import cv2
import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, real_category

from dmdd.config import SynthesisConfig
from dmdd.data import AnomalySynthesizer, PairDataset, TextureSource, load_category
from dmdd.data.foreground import ForegroundCache, foreground_mask, resolve_policy
from dmdd.data.synthesis import AUGMENTERS, perlin_mask, perlin_noise
from dmdd.errors import ConfigError


def object_image(size=64) -> np.ndarray:
    """A bright disc (the object) on a dark, slightly noisy background."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
    img = np.where(disc[..., None], [200, 170, 120], [15, 15, 20]) + rng.normal(0, 4, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8), disc


def test_same_seed_gives_byte_identical_pairs():
    image, _ = object_image()
    synth = AnomalySynthesizer(SynthesisConfig())
    fg = np.ones((64, 64), bool)
    a1, m1 = synth(image, fg, np.random.default_rng(5))
    a2, m2 = synth(image, fg, np.random.default_rng(5))
    a3, _ = synth(image, fg, np.random.default_rng(6))
    assert a1.tobytes() == a2.tobytes() and m1.tobytes() == m2.tobytes()
    assert a1.tobytes() != a3.tobytes()


@pytest.mark.parametrize("seed", range(5))
def test_mask_marks_exactly_the_changed_pixels(seed):
    image, _ = object_image()
    synth = AnomalySynthesizer(SynthesisConfig())
    anomalous, mask = synth(image, np.ones((64, 64), bool), np.random.default_rng(seed))
    original = image.astype(np.float32) / 255
    changed = np.abs(anomalous - original).max(axis=2) > 1e-6
    outside = mask == 0
    assert not changed[outside].any()  # nothing changes outside the mask
    assert mask.any() and changed[mask == 1].mean() > 0.95  # (texture == image on a pixel is the rare exception)
    assert anomalous.min() >= 0 and anomalous.max() <= 1


class FixedTexture:
    """A texture source that always gives the same known texture (so A of the formula is known)."""

    def __init__(self, texture: np.ndarray) -> None:
        self.texture = texture

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        return self.texture


@pytest.mark.parametrize("seed", range(3))
def test_blend_follows_the_formula(seed, monkeypatch):
    """I_a = I (1 - M) + (1 - β) A M + β I M with one β ~ U[0, β_max) per image, checked pixel by pixel against
    the known texture A (augmentation switched off) and the image I, both random colour images."""
    from dmdd.data import synthesis

    monkeypatch.setattr(synthesis, "augment_texture", lambda texture, rng: texture)
    draw = np.random.default_rng(100 + seed)
    image = draw.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    texture = draw.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    synth = AnomalySynthesizer(SynthesisConfig(beta_max=0.5), textures=FixedTexture(texture))
    anomalous, mask = synth(image, np.ones((32, 32), bool), np.random.default_rng(seed))
    i, a = image.astype(np.float64) / 255, texture.astype(np.float64) / 255
    m = mask.astype(bool)
    assert m.any() and (~m).any()
    assert np.array_equal(anomalous[~m], image[~m].astype(np.float32) / 255)  # untouched outside the mask
    # Inside, each value is an affine mix of the two: solve for β where I and A differ enough to tell
    inside, clear = anomalous[m].astype(np.float64), np.abs(i[m] - a[m]) > 0.2
    betas = ((inside - a[m]) / (i[m] - a[m]))[clear]
    beta = float(np.median(betas))
    assert 0 <= beta < 0.5 and np.abs(betas - beta).max() < 1e-5  # one β for every pixel and channel
    expected = i * (1 - m[..., None]) + ((1 - beta) * a + beta * i) * m[..., None]
    assert np.abs(anomalous - expected).max() < 1e-6


def test_masks_stay_inside_the_foreground_of_an_object_image():
    image, disc = object_image()
    cfg = SynthesisConfig()
    fg = foreground_mask(image, cfg)
    assert (fg & disc).sum() / disc.sum() > 0.9 and (fg & ~disc).sum() / (~disc).sum() < 0.05
    synth = AnomalySynthesizer(cfg)
    for seed in range(6):
        _, mask = synth(image, fg, np.random.default_rng(seed))
        assert mask.any() and not (mask.astype(bool) & ~fg).any()


def test_foreground_policy_auto_object_vs_texture():
    cfg = SynthesisConfig()
    objects = [object_image()[0] for _ in range(4)]
    assert resolve_policy(objects, cfg, ForegroundCache(cfg)) == "object"
    rng = np.random.default_rng(0)
    textures = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(4)]
    assert resolve_policy(textures, cfg, ForegroundCache(cfg)) == "texture"
    assert resolve_policy(objects, SynthesisConfig(foreground="texture"), ForegroundCache(cfg)) == "texture"


def small_part_images(count: int, share: float, size: int = 128) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A dark elongated part covering ``share`` of a plain light image, at a different place and angle in each."""
    rng = np.random.default_rng(3)
    images, masks = [], []
    for _ in range(count):
        mask = np.zeros((size, size), np.uint8)
        long_axis = np.sqrt(share * size * size / np.pi * 4)
        centre = tuple(int(v) for v in rng.uniform(0.3, 0.7, 2) * size)
        axes = (int(long_axis), max(2, int(share * size * size / (np.pi * long_axis))))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        image = np.where(mask[..., None] > 0, [60, 60, 70], [180, 180, 180]) + rng.normal(0, 4, (size, size, 3))
        images.append(np.clip(image, 0, 255).astype(np.uint8))
        masks.append(mask > 0)
    return images, masks


def test_a_small_part_on_a_plain_background_is_an_object_with_its_own_mask():
    # a part covering 1 % of the frame: GrabCut finds it; it is not "almost nothing" (the 2 % of earlier versions
    # replaced it by the whole image, which made the category a texture)
    cfg = SynthesisConfig()
    images, truths = small_part_images(8, 0.01)
    cache = ForegroundCache(cfg)
    assert resolve_policy(images, cfg, cache) == "object"
    for image, truth in zip(images, truths):
        found = cache.get(image)
        assert (found & truth).sum() / (found | truth).sum() > 0.8
    earlier = SynthesisConfig(min_foreground_coverage=0.02)
    assert resolve_policy(images, earlier, ForegroundCache(earlier)) == "texture"
    # a plain image without any part still falls back to the whole image
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert foreground_mask(blank, cfg).all()


@pytest.mark.parametrize("low, high", [(0.5, 0.4), (-0.1, 0.9), (0.0, 1.5)])
def test_foreground_coverage_bounds_are_checked(low, high):
    with pytest.raises(ConfigError, match="min_foreground_coverage"):
        SynthesisConfig(min_foreground_coverage=low, max_foreground_coverage=high)


def test_foreground_cache_computes_once_and_persists(tmp_path):
    image, _ = object_image()
    cfg = SynthesisConfig(foreground_cache_dir=str(tmp_path / "fg"))
    cache = ForegroundCache(cfg)
    first = cache.get(image)
    assert np.array_equal(cache.get(image), first) and cache.computed == 1
    fresh = ForegroundCache(cfg)  # a new process: reads the disk cache
    assert np.array_equal(fresh.get(image), first) and fresh.computed == 0


def test_pair_dataset_reuses_foregrounds_across_epochs(tiny_tree):
    cat = load_category(tiny_tree)
    cfg = SynthesisConfig(foreground="object")
    cache = ForegroundCache(cfg)
    pairs = PairDataset(cat.train, 64, AnomalySynthesizer(cfg), seed=0, foregrounds=cache)
    computed = cache.computed
    assert computed == len(cat.train)
    first = [pairs[i][1] for i in range(3)]
    pairs.set_epoch(1)
    second = [pairs[i][1] for i in range(3)]
    pairs.set_epoch(0)
    again = [pairs[i][1] for i in range(3)]
    assert cache.computed == computed
    assert all((a == b).all() for a, b in zip(first, again))
    assert any((a != b).any() for a, b in zip(first, second))
    normal, anomalous, mask = pairs[0]
    assert normal.shape == anomalous.shape == (3, 64, 64) and mask.shape == (1, 64, 64)


def test_perlin_noise_and_mask_shapes_for_every_scale():
    rng = np.random.default_rng(0)
    for res in (1, 2, 8, 64):
        assert perlin_noise((48, 48), (res, res), rng).shape == (48, 48)
    assert perlin_mask(48, rng, 6, 0.5).dtype == bool


def test_all_ten_augmenters_keep_shape_and_dtype():
    texture = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    for aug in AUGMENTERS:
        out = aug(texture, np.random.default_rng(1))
        assert out.shape == texture.shape and out.dtype == np.uint8


def test_procedural_textures_without_a_folder():
    source = TextureSource(None)
    a = source.sample(32, np.random.default_rng(0))
    assert a.shape == (32, 32, 3) and a.std() > 1


@pytest.mark.realdata
def test_dtd_texture_folder_is_used():
    folder = SHARED_DATA / "textures" / "dtd10"
    if not folder.is_dir():
        pytest.skip(f"texture folder absent at {folder}")
    source = TextureSource(folder)
    assert len(source.files) == 1200
    assert source.sample(32, np.random.default_rng(0)).shape == (32, 32, 3)


@pytest.mark.realdata
def test_tire_is_an_object_and_magnetic_tile_a_texture():
    cfg = SynthesisConfig()
    for name, expected in (("tire", "object"), ("magnetic_tile", "texture")):
        from dmdd.data import read_image

        cat = load_category(real_category(name))
        images = [read_image(r.image, 128) for r in cat.train[:: max(1, len(cat.train) // 8)][:8]]
        assert resolve_policy(images, cfg, ForegroundCache(cfg)) == expected


def test_grey_images_get_grey_textures_and_colour_images_keep_colour():
    rng_image = np.random.default_rng(0)
    grey = np.repeat(rng_image.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=-1)
    colour = rng_image.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = np.ones((64, 64), dtype=bool)
    synth = AnomalySynthesizer(SynthesisConfig())
    anomalous, mask = synth(grey, full, np.random.default_rng(1))
    assert mask.any()
    assert np.abs(anomalous[..., 0] - anomalous[..., 1]).max() < 1e-5
    assert np.abs(anomalous[..., 1] - anomalous[..., 2]).max() < 1e-5
    anomalous, mask = synth(colour, full, np.random.default_rng(1))
    inside = mask.astype(bool)
    assert np.abs(anomalous[..., 0] - anomalous[..., 1])[inside].max() > 0.05
    coloured = AnomalySynthesizer(SynthesisConfig(grey_textures_on_grey=False))
    anomalous, mask = coloured(grey, full, np.random.default_rng(1))
    assert np.abs(anomalous[..., 0] - anomalous[..., 1])[mask.astype(bool)].max() > 0.01


def test_pair_dataset_keys_name_the_epoch_and_stream(tiny_tree):
    cat = load_category(tiny_tree)
    pairs = PairDataset(cat.train, 64, AnomalySynthesizer(SynthesisConfig()), seed=0)
    pairs.set_epoch(2, 1)
    by_epoch = pairs[3]
    pairs.set_epoch(0)
    by_key = pairs[(2, 1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(by_epoch, by_key))
    assert not torch.equal(pairs[3][1], by_key[1])
