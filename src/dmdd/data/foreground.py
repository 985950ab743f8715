"""Foreground masks for Foreground-aware Anomaly Synthesis: GrabCut, Otsu fallback, whole-image fallback."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dmdd.config import SynthesisConfig


def grabcut_foreground(image: np.ndarray, iterations: int) -> np.ndarray:
    """GrabCut initialised with the rectangle (1, 1, w-2, h-2); keeps definite and probable foreground.

    OpenCV's GrabCut draws from OpenCV's global RNG; it is reseeded here so the same image gives the same mask.
    """
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)
    cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), mask, (1, 1, w - 2, h - 2), bgd, fgd, iterations,
                cv2.GC_INIT_WITH_RECT)  # fmt: skip
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def otsu_foreground(image: np.ndarray) -> np.ndarray:
    """Otsu threshold on grey levels; the foreground is the class that covers less of the image border."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    _, binary = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = binary.astype(bool)
    border = np.concatenate([fg[0], fg[-1], fg[:, 0], fg[:, -1]])
    return ~fg if border.mean() > 0.5 else fg


def foreground_mask(image: np.ndarray, cfg: SynthesisConfig) -> np.ndarray:
    """GrabCut, falling back to Otsu, then to the whole image, when a result is almost empty or almost full.

    GrabCut runs on a copy whose longer side is at most ``cfg.grabcut_size`` (chosen, for speed); the mask is
    resized back with nearest neighbour.
    """
    h, w = image.shape[:2]
    scale = min(1.0, cfg.grabcut_size / max(h, w))
    small = (
        image if scale == 1.0 else cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    )
    low, high = cfg.min_foreground_coverage, cfg.max_foreground_coverage
    for method in (lambda: grabcut_foreground(small, cfg.grabcut_iterations), lambda: otsu_foreground(small)):
        fg = method()
        if low <= fg.mean() <= high:
            return cv2.resize(fg.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return np.ones((h, w), dtype=bool)


class ForegroundCache:
    """Foreground masks computed once per training image: in memory, and on disk when a folder is given.

    Disk entries are keyed by the image bytes' hash, the size and the GrabCut settings, so an edited image or a
    changed setting never reuses a stale mask.
    """

    def __init__(self, cfg: SynthesisConfig) -> None:
        self.cfg = cfg
        self.folder = Path(cfg.foreground_cache_dir) if cfg.foreground_cache_dir else None
        self.memory: dict[str, np.ndarray] = {}
        self.computed = 0  # number of GrabCut runs, for tests and benchmarks

    def _key(self, image: np.ndarray) -> str:
        h = hashlib.sha1(image.tobytes())
        h.update(
            f"{image.shape}-{self.cfg.grabcut_iterations}-{self.cfg.grabcut_size}-{self.cfg.min_foreground_coverage}"
            f"-{self.cfg.max_foreground_coverage}".encode()
        )
        return h.hexdigest()

    def get(self, image: np.ndarray) -> np.ndarray:
        key = self._key(image)
        if key in self.memory:
            return self.memory[key]
        path = self.folder / f"{key}.png" if self.folder else None
        if path is not None and path.is_file():
            cached = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if cached is not None and cached.shape == image.shape[:2]:
                self.memory[key] = cached > 0
                return self.memory[key]
        fg = foreground_mask(image, self.cfg)
        self.computed += 1
        self.memory[key] = fg
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            cv2.imwrite(str(tmp), fg.astype(np.uint8) * 255)
            tmp.replace(path)
        return fg


def boundary_crossings(mask: np.ndarray) -> float:
    """Mean number of foreground/background changes along a row or column: ~2 for one compact object."""
    rows = np.count_nonzero(mask[:, 1:] != mask[:, :-1]) / mask.shape[0]
    cols = np.count_nonzero(mask[1:] != mask[:-1]) / mask.shape[1]
    return float(rows + cols) / 2


def resolve_policy(images: Sequence[np.ndarray], cfg: SynthesisConfig, cache: ForegroundCache, probe: int = 8) -> str:
    """``object`` or ``texture``.

    ``auto`` probes up to ``probe`` evenly spaced images. A category is an object when its foreground (chosen):
    covers less than ``cfg.object_max_coverage`` of the image on average; covers a similar share in every image
    (coefficient of variation < ``cfg.object_max_coverage_cv``); and is compact (fewer than
    ``cfg.object_max_crossings`` foreground/background changes per image line). On textures GrabCut cuts
    fragmented or widely varying regions.
    """
    if cfg.foreground != "auto":
        return cfg.foreground
    if not images:
        return "texture"
    picks = np.linspace(0, len(images) - 1, num=min(probe, len(images))).round().astype(int)
    masks = [cache.get(images[i]) for i in picks]
    coverage = np.array([m.mean() for m in masks])
    variation = coverage.std() / max(coverage.mean(), 1e-8)
    crossings = float(np.mean([boundary_crossings(m) for m in masks]))
    is_object = (
        coverage.mean() < cfg.object_max_coverage
        and variation < cfg.object_max_coverage_cv
        and crossings < cfg.object_max_crossings
    )
    return "object" if is_object else "texture"
