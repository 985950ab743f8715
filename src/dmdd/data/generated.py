"""A built-in, seeded MVTec-layout dataset of industrial-looking surfaces with realistic defects.

Used by ``dmdd demo`` (no data, no network needed) and by the tests. Surfaces are brushed metal or woven fabric;
defects are scratches, dents/spots and contamination, each with its exact pixel mask.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from dmdd.data.synthesis import perlin_noise

DEFECTS = ("scratch", "spot", "contamination")


def _surface(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: a normal surface of the category."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "metal":
        streaks = cv2.GaussianBlur(rng.normal(0, 1, (size, 1)).repeat(size, axis=1).astype(np.float32), (0, 0), 0.7)
        base = (
            0.55
            + 0.04 * streaks
            + 0.05 * perlin_noise((size, size), (2, 2), rng)
            + 0.02 * rng.normal(size=(size, size))
        )
        tint = np.array([1.0, 1.0, 1.03])
    else:  # fabric
        period = 8 + rng.uniform(-0.3, 0.3)
        weave = np.sin(2 * np.pi * size * xx / period) * np.sin(2 * np.pi * size * yy / period)
        base = (
            0.45 + 0.08 * weave + 0.03 * perlin_noise((size, size), (4, 4), rng) + 0.015 * rng.normal(size=(size, size))
        )
        tint = np.array([0.85, 0.95, 1.1])
    return np.clip(base[..., None] * tint, 0, 1)


def _defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add one defect; returns (image, mask (H, W) bool) with the mask marking the changed pixels."""
    size = image.shape[0]
    mask = np.zeros((size, size), np.uint8)
    if kind == "scratch":
        p0 = rng.uniform(0.15, 0.85, 2) * size
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.2, 0.45) * size
        p1 = p0 + length * np.array([np.cos(angle), np.sin(angle)])
        cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in p1), 1, max(1, size // 48))
        shade = rng.choice([-0.35, 0.35])
    elif kind == "spot":
        center = tuple(int(v) for v in rng.uniform(0.2, 0.8, 2) * size)
        axes = tuple(int(v) for v in rng.uniform(0.03, 0.08, 2) * size + 1)
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        shade = -0.3
    else:
        blob = perlin_noise((size, size), (4, 4), rng) > 0.35
        window = np.zeros((size, size), bool)
        c = (rng.uniform(0.25, 0.75, 2) * size).astype(int)
        r = int(size * 0.15)
        window[max(c[0] - r, 0) : c[0] + r, max(c[1] - r, 0) : c[1] + r] = True
        mask = (blob & window).astype(np.uint8)
        if not mask.any():
            mask[c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2] = 1
        shade = 0.0
    out = image.copy()
    m = mask.astype(bool)
    if kind == "contamination":
        out[m] = np.array([0.55, 0.35, 0.15]) + 0.05 * rng.normal(size=(int(m.sum()), 3))
    else:
        out[m] = np.clip(out[m] + shade, 0, 1)
    return np.clip(out, 0, 1), m


def _save(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor((image * 255).round().astype(np.uint8), cv2.COLOR_RGB2BGR))


def make_demo_dataset(
    root: str | Path,
    category: str = "metal",
    size: int = 128,
    train: int = 40,
    test_good: int = 10,
    test_per_defect: int = 6,
    seed: int = 0,
) -> Path:
    """Write ``root/category`` in the MVTec AD layout and return that folder.

    Args:
        root: dataset root.
        category: ``metal`` (brushed metal) or ``fabric`` (woven fabric).
        size: image side in pixels.
        train: number of good training images.
        test_good: number of good test images.
        test_per_defect: test images per defect type (scratch, spot, contamination).
        seed: one seed gives identical files.
    """
    if category not in ("metal", "fabric"):
        raise ValueError(f"demo category must be metal or fabric, got {category!r}")
    rng = np.random.default_rng(seed)
    folder = Path(root) / category
    for i in range(train):
        _save(folder / "train" / "good" / f"{i:03d}.png", _surface(category, size, rng))
    for i in range(test_good):
        _save(folder / "test" / "good" / f"{i:03d}.png", _surface(category, size, rng))
    for kind in DEFECTS:
        for i in range(test_per_defect):
            image, mask = _defect(_surface(category, size, rng), kind, rng)
            _save(folder / "test" / kind / f"{i:03d}.png", image)
            target = folder / "ground_truth" / kind / f"{i:03d}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), mask.astype(np.uint8) * 255)
    return folder
