"""High-resolution images as tiles (``model.tile``): the grid, cutting, and stitching maps back with overlap weights.

An image is first scaled by ``tile_scale``; square tiles of ``tile`` pixels are laid on a grid whose stride is
``tile * (1 - tile_overlap)`` (the last row and column end flush with the image, so every pixel is covered); each
tile is brought to the model's ``image_size`` and scored on its own. The maps come back to the tile's pixels and are
blended with a weight that falls towards the tile's borders (a raised cosine with a floor, so a pixel covered by one
tile alone keeps its value): a constant map stitches to the same constant, and no seam shows where tiles meet.
The image score is the largest of its tiles' scores. Images smaller than a tile are padded (edge pixels repeated)
and the map is cut back. Tiles are scored in batches and only the stitched map (float32, the scaled image's size)
is kept, so memory grows with the image's pixels, not with the network's feature maps.

numpy + OpenCV only: the torch-free ONNX / OpenVINO inferencers share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

WEIGHT_FLOOR = 0.05  # the blend weight at a tile's outermost pixels (relative to 1 at its centre)


@dataclass(frozen=True)
class TileSpec:
    """Tile size in (scaled) image pixels, overlap as a share of the tile, and the scale applied first."""

    size: int
    overlap: float = 0.25
    scale: float = 1.0

    @property
    def stride(self) -> int:
        return max(1, int(round(self.size * (1 - self.overlap))))

    @classmethod
    def of(cls, cfg) -> TileSpec | None:
        """From a ``ModelConfig`` (or an export's metadata dict); None when tiling is off."""
        get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
        size = int(get("tile", 0) or 0)
        return cls(size, float(get("tile_overlap", 0.25)), float(get("tile_scale", 1.0))) if size else None


def starts(length: int, size: int, stride: int) -> list[int]:
    """Tile starts along one axis covering [0, length): every ``stride``, the last flush with the end."""
    if length <= size:
        return [0]
    out = list(range(0, length - size, stride))
    return out + [length - size]


def grid(hw: tuple[int, int], spec: TileSpec) -> list[tuple[int, int]]:
    """(top, left) of every tile of an (H, W) image (already scaled)."""
    return [(t, x) for t in starts(hw[0], spec.size, spec.stride) for x in starts(hw[1], spec.size, spec.stride)]


def scaled(image: np.ndarray, spec: TileSpec) -> np.ndarray:
    """The image at ``spec.scale`` (area interpolation down, linear up)."""
    if spec.scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(1, round(w * spec.scale)), max(1, round(h * spec.scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if spec.scale < 1 else cv2.INTER_LINEAR)


def padded(image: np.ndarray, size: int) -> np.ndarray:
    """An image with a side shorter than one tile, padded to it by repeating its edge pixels."""
    h, w = image.shape[:2]
    if h >= size and w >= size:
        return image
    pad = [(0, max(0, size - h)), (0, max(0, size - w))] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="edge")


def cut(image: np.ndarray, top: int, left: int, size: int, out_size: int, nearest: bool = False) -> np.ndarray:
    """One tile, brought to the model's input size."""
    tile = image[top : top + size, left : left + size]
    if size == out_size:
        return np.ascontiguousarray(tile)
    interpolation = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if size > out_size else cv2.INTER_LINEAR)
    return cv2.resize(tile, (out_size, out_size), interpolation=interpolation)


def weights(size: int) -> np.ndarray:
    """(size, size) blend weights: a raised cosine from the tile's centre, never below WEIGHT_FLOOR."""
    ramp = np.sin(np.pi * (np.arange(size) + 0.5) / size)
    w = np.maximum(np.outer(ramp, ramp), WEIGHT_FLOOR)
    return w.astype(np.float32)


def tiles_of(image: np.ndarray, spec: TileSpec, out_size: int, batch: int) -> Iterator[tuple[list, np.ndarray]]:
    """Batches of (positions, (B, S, S, 3) uint8 tiles) of a scaled, padded image."""
    positions = grid(image.shape[:2], spec)
    for start in range(0, len(positions), batch):
        chunk = positions[start : start + batch]
        yield chunk, np.stack([cut(image, t, x, spec.size, out_size) for t, x in chunk])


def score_tiled(image: np.ndarray, spec: TileSpec, out_size: int,
                run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], batch: int = 8,
                ) -> tuple[float, np.ndarray]:  # fmt: skip
    """Score an (H, W, 3) uint8 image tile by tile.

    Args:
        run: (B, S, S, 3) uint8 tiles -> (scores (B,), maps (B, S, S)), the model on a batch.

    Returns:
        (image score: the largest tile score, the stitched map at the image's own (H, W)).
    """
    h, w = image.shape[:2]
    work = padded(scaled(image, spec), spec.size)
    total = np.zeros(work.shape[:2], np.float32)
    weight_sum = np.zeros(work.shape[:2], np.float32)
    blend = weights(spec.size)
    best = -np.inf
    for positions, tiles in tiles_of(work, spec, out_size, batch):
        scores, maps = run(tiles)
        best = max(best, float(np.max(scores)))
        for (t, x), amap in zip(positions, maps):
            amap = np.asarray(amap, np.float32)
            if amap.shape[0] != spec.size:
                amap = cv2.resize(amap, (spec.size, spec.size), interpolation=cv2.INTER_LINEAR)
            total[t : t + spec.size, x : x + spec.size] += amap * blend
            weight_sum[t : t + spec.size, x : x + spec.size] += blend
    sh, sw = scaled_shape((h, w), spec)
    stitched = (total / weight_sum)[:sh, :sw]
    if (sh, sw) != (h, w):
        stitched = cv2.resize(stitched, (w, h), interpolation=cv2.INTER_LINEAR)
    return best, stitched


def scaled_shape(hw: tuple[int, int], spec: TileSpec) -> tuple[int, int]:
    h, w = hw
    return (h, w) if spec.scale == 1.0 else (max(1, round(h * spec.scale)), max(1, round(w * spec.scale)))


def random_tile(image: np.ndarray, mask: np.ndarray | None, spec: TileSpec, out_size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """A tile at a uniformly random position of a scaled image (and the same tile of its foreground mask)."""
    image = padded(image, spec.size)
    top = int(rng.integers(0, image.shape[0] - spec.size + 1))
    left = int(rng.integers(0, image.shape[1] - spec.size + 1))
    tile = cut(image, top, left, spec.size, out_size)
    if mask is None:
        return tile, None
    return tile, cut(padded(mask.astype(np.uint8), spec.size), top, left, spec.size, out_size, nearest=True) > 0


def draw_grid(image: np.ndarray, spec: TileSpec, colour=(255, 255, 0)) -> np.ndarray:
    """The tile grid drawn on a copy of an image (at the image's own size), for reports."""
    out = image.copy()
    factor = 1.0 / spec.scale
    work_hw = scaled_shape(image.shape[:2], spec)
    for t, x in grid((max(work_hw[0], spec.size), max(work_hw[1], spec.size)), spec):
        p0 = (int(x * factor), int(t * factor))
        p1 = (int((x + spec.size) * factor) - 1, int((t + spec.size) * factor) - 1)
        cv2.rectangle(out, p0, p1, colour, max(1, int(round(factor))))
    return out
