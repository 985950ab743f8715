"""Deployment inference with ONNX Runtime: needs numpy, OpenCV, Pillow and onnxruntime, no torch, no training code.

Example:
    >>> from dmdd.inference import OnnxInferencer
    >>> detector = OnnxInferencer("model.onnx")          # reads model.json beside it
    >>> result = detector.predict(rgb_uint8_image)          # (H, W, 3) uint8
    >>> result.score, result.anomalous, result.anomaly_map.shape  # map at the image's own size
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmdd.geometry import from_square, to_square


@dataclass
class Detection:
    """One image's result.

    Attributes:
        score: image anomaly score.
        anomalous: ``score >= image threshold`` (None without a threshold).
        anomaly_map: (H, W) float32 map at the input image's size.
        mask: (H, W) bool, ``anomaly_map >= pixel threshold`` (None without a threshold).
    """

    score: float
    anomalous: bool | None
    anomaly_map: np.ndarray
    mask: np.ndarray | None


class OnnxInferencer:
    """Run an exported DMDD model.

    Args:
        path: the ``.onnx`` file; its JSON sidecar (same name, ``.json``) or embedded metadata give the input size
            and the calibrated thresholds.
        providers: ONNX Runtime execution providers (default: CUDA when available, then CPU).
        threads: intra-op threads (``None``: ONNX Runtime's default).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.meta = self._metadata()
        self.image_size = int(self.meta["image_size"])
        self.resize = self.meta.get("resize", "squash")
        thresholds = self.meta.get("thresholds") or {}
        self.image_threshold = thresholds.get("image")
        self.pixel_threshold = thresholds.get("pixel")

    def _metadata(self) -> dict:
        sidecar = self.path.with_suffix(".json")
        if sidecar.is_file():
            return json.loads(sidecar.read_text())
        props = self.session.get_modelmeta().custom_metadata_map
        if "dmdd" in props:
            return json.loads(props["dmdd"])
        raise ValueError(f"{self.path} carries no dmdd metadata and has no {sidecar.name} beside it")

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float32 in [0, 1] -> (scores (B,), maps (B, 1, S, S))."""
        scores, maps = self.session.run(["pred_score", "anomaly_map"], {"images": images.astype(np.float32)})
        return scores, maps

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32 in [0, 1]."""
        resized = to_square(image, self.image_size, self.resize)
        return resized.astype(np.float32).transpose(2, 0, 1) / 255.0

    def predict(self, image: np.ndarray) -> Detection:
        """Score one (H, W, 3) uint8 RGB image; the map comes back at the image's own size."""
        scores, maps = self.run(self.preprocess(image)[None])
        h, w = image.shape[:2]
        amap = from_square(maps[0, 0], (h, w), self.resize)
        score = float(scores[0])
        anomalous = None if self.image_threshold is None else score >= self.image_threshold
        mask = None if self.pixel_threshold is None else amap >= self.pixel_threshold
        return Detection(score, anomalous, amap, mask)
