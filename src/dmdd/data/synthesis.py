"""Anomaly synthesis after DRAEM, restricted to the foreground (paper §3.4.1, docs/design.md §2).

Every function takes an explicit ``numpy.random.Generator``; the same generator state gives byte-identical output.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from dmdd.config import SynthesisConfig
from dmdd.data.io import IMAGE_SUFFIXES, read_image
from dmdd.errors import DatasetError


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise with ``res`` lattice cells per axis, values roughly in [-1, 1].

    Computed on a grid that ``res`` divides, then cropped to ``shape``.
    """
    h = int(np.ceil(shape[0] / res[0]) * res[0])
    w = int(np.ceil(shape[1] / res[1]) * res[1])
    cell = (h // res[0], w // res[1])
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (ry+1, rx+1, 2)
    grads = np.repeat(np.repeat(grads, cell[0], axis=0), cell[1], axis=1)
    ys = (np.arange(h) % cell[0]) / cell[0]
    xs = (np.arange(w) % cell[1]) / cell[1]
    fy, fx = np.meshgrid(ys, xs, indexing="ij")  # position inside the cell, (h, w)

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grads[dy * cell[0] : dy * cell[0] + h, dx * cell[1] : dx * cell[1] + w]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    ty, tx = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - tx) + corner(0, 1) * tx
    bottom = corner(1, 0) * (1 - tx) + corner(1, 1) * tx
    noise = np.sqrt(2) * (top * (1 - ty) + bottom * ty)
    return noise[: shape[0], : shape[1]]


def perlin_mask(size: int, rng: np.random.Generator, max_scale_exp: int, threshold: float) -> np.ndarray:
    """DRAEM mask: Perlin noise at scale 2^k per axis (k ~ U{0..max}), rotated U(-90°, 90°), thresholded."""
    res = (2 ** int(rng.integers(0, max_scale_exp + 1)), 2 ** int(rng.integers(0, max_scale_exp + 1)))
    noise = perlin_noise((size, size), res, rng)
    angle = float(rng.uniform(-90, 90))
    rot = cv2.getRotationMatrix2D((size / 2, size / 2), angle, 1.0)
    noise = cv2.warpAffine(noise.astype(np.float32), rot, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return noise > threshold


# --- DRAEM's augmenters (3 of 10 are applied to the texture source) -------------------------------------------

Augmenter = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _gamma(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0)
    return (255.0 * (img / 255.0) ** gamma).astype(np.uint8)


def _brightness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30), 0, 255).astype(np.uint8)


def _sharpness(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageEnhance.Sharpness(Image.fromarray(img)).enhance(rng.uniform(0.0, 2.0)))


def _hue_saturation(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-50, 51)) // 2) % 180  # OpenCV hue is 0..179
    hsv[..., 1] = np.clip(hsv[..., 1] + int(rng.integers(-50, 51)), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = int(rng.integers(32, 129))
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8) if rng.random() < 0.5 else img


def _posterize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.posterize(Image.fromarray(img), int(rng.integers(1, 9))))


def _invert(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 255 - img


def _autocontrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.autocontrast(Image.fromarray(img)))


def _equalize(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(ImageOps.equalize(Image.fromarray(img)))


def _rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    rot = cv2.getRotationMatrix2D((w / 2, h / 2), float(rng.uniform(-45, 45)), 1.0)
    return cv2.warpAffine(img, rot, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


AUGMENTERS: tuple[Augmenter, ...] = (
    _gamma, _brightness, _sharpness, _hue_saturation, _solarize,
    _posterize, _invert, _autocontrast, _equalize, _rotate,
)  # fmt: skip


def augment_texture(texture: np.ndarray, rng: np.random.Generator, count: int = 3) -> np.ndarray:
    """Apply ``count`` distinct augmenters, chosen at random, in random order."""
    for index in rng.choice(len(AUGMENTERS), size=count, replace=False):
        texture = AUGMENTERS[int(index)](texture, rng)
    return np.ascontiguousarray(texture, dtype=np.uint8)


# --- texture sources ------------------------------------------------------------------------------------------


def procedural_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """An offline texture source: coloured multi-octave noise, stripes, or blotches, (size, size, 3) uint8."""
    kind = int(rng.integers(0, 3))
    c0, c1 = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
    if kind == 0:
        field = sum(perlin_noise((size, size), (2**o, 2**o), rng) / 2**o for o in range(1, 6))
    elif kind == 1:
        yy, xx = np.mgrid[0:size, 0:size] / size
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(4, 32)
        field = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        field = field + 0.3 * perlin_noise((size, size), (8, 8), rng)
    else:
        field = (perlin_noise((size, size), (4, 4), rng) > rng.uniform(-0.2, 0.2)).astype(np.float64)
        field = field + 0.2 * perlin_noise((size, size), (32, 32), rng)
    t = (field - field.min()) / max(float(np.ptp(field)), 1e-8)
    return np.clip(c0 * (1 - t[..., None]) + c1 * t[..., None], 0, 255).astype(np.uint8)


class TextureSource:
    """Random texture images from a folder (DTD), or procedural textures when no folder is given."""

    def __init__(self, folder: str | Path | None) -> None:
        self.files: list[Path] = []
        if folder is not None:
            root = Path(folder)
            if not root.is_dir():
                raise DatasetError(f"texture folder not found: {root}; pass an existing folder or none")
            self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not self.files:
                raise DatasetError(f"texture folder {root} holds no images")

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        if not self.files:
            return procedural_texture(size, rng)
        return read_image(self.files[int(rng.integers(0, len(self.files)))], size)


# --- the synthesis ----------------------------------------------------------------------------------------------


def is_grey(image: np.ndarray) -> bool:
    """True when an (S, S, 3) RGB image has (almost) equal channels: a grey-scale camera image."""
    img = image.astype(np.int16)
    return int(np.abs(img[..., 0] - img[..., 1]).max()) <= 2 and int(np.abs(img[..., 1] - img[..., 2]).max()) <= 2


class AnomalySynthesizer:
    """Foreground-aware Anomaly Synthesis: I_a = I ⊙ (1 − M) + (1 − β) A ⊙ M + β I ⊙ M with M = M_noise ⊙ M_fore."""

    def __init__(self, cfg: SynthesisConfig, textures: TextureSource | None = None) -> None:
        self.cfg = cfg
        self.textures = textures if textures is not None else TextureSource(cfg.texture_dir)

    def mask(self, size: int, foreground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """M = M_noise ⊙ M_fore; the noise is resampled (bounded tries) while M is empty. (size, size) bool."""
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(self.cfg.max_mask_tries):
            mask = perlin_mask(size, rng, self.cfg.perlin_max_scale_exp, self.cfg.perlin_threshold) & foreground
            if mask.any():
                break
        return mask

    def __call__(
        self, image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Make the anomalous copy of one image.

        Args:
            image: (S, S, 3) uint8 RGB normal image.
            foreground: (S, S) bool foreground mask (all True for textures or with FAS off).
            rng: generator for every draw.

        Returns:
            (anomalous image (S, S, 3) float32 in [0, 1], mask (S, S) float32 in {0, 1}).
        """
        size = image.shape[0]
        mask = self.mask(size, foreground, rng)
        texture = augment_texture(self.textures.sample(size, rng), rng).astype(np.float32) / 255.0
        if self.cfg.grey_textures_on_grey and is_grey(image):  # a grey camera never shows colour
            texture = np.repeat(texture.mean(axis=-1, keepdims=True), 3, axis=-1)
        beta = np.float32(rng.uniform(0.0, self.cfg.beta_max))
        img = image.astype(np.float32) / 255.0
        m = mask[..., None].astype(np.float32)
        anomalous = img * (1 - m) + (1 - beta) * texture * m + beta * img * m
        return anomalous.astype(np.float32), mask.astype(np.float32)
