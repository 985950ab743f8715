"""How an image of any aspect ratio becomes the model's square input, and how a map goes back (numpy + OpenCV only,
so the torch-free ONNX inferencer shares it)."""

from __future__ import annotations

import cv2
import numpy as np

RESIZE_MODES = ("squash", "pad", "crop")


def _resize(image: np.ndarray, h: int, w: int, nearest: bool = False) -> np.ndarray:
    if image.shape[:2] == (h, w):
        return image
    if nearest:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if image.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interpolation)


def square_geometry(hw: tuple[int, int], size: int, mode: str) -> tuple[int, int, int, int]:
    """Where an (H, W) image lies in its (size, size) square: (resized h, resized w, top, left).

    ``squash`` stretches it to the square (size, size, 0, 0); ``pad`` keeps the aspect ratio, longer side = size,
    centred on a black square (top/left >= 0); ``crop`` keeps the aspect ratio, shorter side = size, centre crop
    (top/left <= 0: the square starts inside the resized image).
    """
    h, w = hw
    if mode == "squash":
        return size, size, 0, 0
    if mode not in ("pad", "crop"):
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    scale = size / (max(h, w) if mode == "pad" else min(h, w))
    rh, rw = max(1, round(h * scale)), max(1, round(w * scale))
    return rh, rw, (size - rh) // 2, (size - rw) // 2


def to_square(image: np.ndarray, size: int, mode: str = "squash", nearest: bool = False) -> np.ndarray:
    """(H, W, ...) image or mask -> (size, size, ...) by ``mode`` (see :func:`square_geometry`)."""
    rh, rw, top, left = square_geometry(image.shape[:2], size, mode)
    resized = _resize(image, rh, rw, nearest)
    if mode == "squash":
        return resized
    out = np.zeros((size, size, *image.shape[2:]), dtype=image.dtype)
    src = resized[max(0, -top) : max(0, -top) + size, max(0, -left) : max(0, -left) + size]
    out[max(0, top) : max(0, top) + src.shape[0], max(0, left) : max(0, left) + src.shape[1]] = src
    return out


def from_square(amap: np.ndarray, hw: tuple[int, int], mode: str = "squash") -> np.ndarray:
    """A (size, size) map on the square input -> (H, W) on the original image (bilinear). With ``crop`` the parts
    the model never saw get the map's minimum."""
    size = amap.shape[0]
    h, w = hw
    rh, rw, top, left = square_geometry(hw, size, mode)
    if mode == "pad":
        amap = amap[top : top + rh, left : left + rw]
    elif mode == "crop":
        canvas = np.full((rh, rw), amap.min(), dtype=amap.dtype)
        canvas[-top : -top + size, -left : -left + size] = amap
        amap = canvas
    return cv2.resize(np.ascontiguousarray(amap), (w, h), interpolation=cv2.INTER_LINEAR)
