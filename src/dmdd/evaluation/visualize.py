"""Heatmap overlays and image panels (uint8 RGB arrays)."""

from __future__ import annotations

import cv2
import numpy as np


def colorize(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 RGB with the JET colormap over [vmin, vmax]."""
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return cv2.cvtColor(cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured map over an (H, W, 3) uint8 image of the same size."""
    heat = colorize(anomaly_map, vmin, vmax)
    return (image.astype(np.float32) * (1 - alpha) + heat.astype(np.float32) * alpha).astype(np.uint8)


def threshold_overlay(image: np.ndarray, anomaly_map: np.ndarray, pixel_threshold: float | None) -> np.ndarray:
    """The overlay of a prediction: colour scale from 0 to twice the pixel threshold, or to the map's maximum if
    that is larger (``dmdd predict`` and ``dmdd serve``)."""
    vmax = max(2 * pixel_threshold if pixel_threshold is not None else 0.0, float(anomaly_map.max()), 1e-6)
    return overlay(image, anomaly_map, 0.0, vmax)


def outline(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """Draw the contours of a (H, W) bool mask onto a copy of the image."""
    out = image.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, 1)
    return out


def heatmap_panel(image: np.ndarray, mask: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """image | ground truth | anomaly-map overlay, side by side, with a 4 px white gap."""
    gt = np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2)
    gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([image, gap, gt, gap, outline(overlay(image, anomaly_map, vmin, vmax), mask)], axis=1)
