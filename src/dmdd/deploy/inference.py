"""Deployment inference with ONNX Runtime or OpenVINO: needs numpy, OpenCV, Pillow and the runtime, no torch, no
training code.

Example:
    >>> from dmdd.deploy.inference import OnnxInferencer, OpenVinoInferencer
    >>> detector = OnnxInferencer("model.onnx")          # reads model.json beside it
    >>> detector = OpenVinoInferencer("model.xml")       # `dmdd export --format openvino`, reads model.json
    >>> result = detector.predict(rgb_uint8_image)          # (H, W, 3) uint8
    >>> result.score, result.anomalous, result.anomaly_map.shape  # map at the image's own size
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dmdd.data.geometry import from_square, to_square
from dmdd.data.tiles import TileSpec, score_tiled


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


class _Inferencer:
    """What every runtime shares: metadata (input size, resize mode, thresholds), pre- and post-processing."""

    path: Path

    def _setup(self, meta: dict) -> None:
        self.meta = meta
        self.image_size = int(meta["image_size"])
        self.resize = meta.get("resize", "squash")
        self.tiles = TileSpec.of(meta)  # tile settings of the checkpoint, reproduced without flags
        thresholds = meta.get("thresholds") or {}
        self.image_threshold = thresholds.get("image")
        self.pixel_threshold = thresholds.get("pixel")
        self.threshold_source = meta.get("threshold_source") or (
            "thresholds of the export (source not recorded)" if self.image_threshold is not None else None)

    def _sidecar(self) -> dict | None:
        sidecar = self.path.with_suffix(".json")
        return json.loads(sidecar.read_text()) if sidecar.is_file() else None

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) float32 in [0, 1] -> (scores (B,), maps (B, 1, S, S))."""
        raise NotImplementedError

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32 in [0, 1]."""
        resized = to_square(image, self.image_size, self.resize)
        return resized.astype(np.float32).transpose(2, 0, 1) / 255.0

    def score_full(self, images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        """(score, map at the image's own size) of (H, W, 3) uint8 RGB images: one batch of squares, or each image
        tile by tile when the model was trained on tiles."""
        if self.tiles is not None:
            return [score_tiled(im, self.tiles, self.image_size, self._run_tiles) for im in images]
        scores, maps = self.run(np.stack([self.preprocess(im) for im in images]))
        return [(float(s), from_square(np.asarray(m[0], np.float32), im.shape[:2], self.resize))
                for s, m, im in zip(scores, maps, images)]  # fmt: skip

    def _run_tiles(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.run(tiles.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
        return scores, maps[:, 0]

    def predict(self, image: np.ndarray) -> Detection:
        """Score one (H, W, 3) uint8 RGB image; the map comes back at the image's own size."""
        ((score, amap),) = self.score_full([image])
        anomalous = None if self.image_threshold is None else score >= self.image_threshold
        mask = None if self.pixel_threshold is None else amap >= self.pixel_threshold
        return Detection(score, anomalous, amap, mask)


class OnnxInferencer(_Inferencer):
    """Run an exported DMDD model with ONNX Runtime.

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
        meta = self._sidecar()
        if meta is None:
            props = self.session.get_modelmeta().custom_metadata_map
            if "dmdd" not in props:
                raise ValueError(f"{self.path} carries no dmdd metadata and has no {self.path.stem}.json beside it")
            meta = json.loads(props["dmdd"])
        self._setup(meta)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(["pred_score", "anomaly_map"], {"images": images.astype(np.float32)})
        return scores, maps


class OpenVinoInferencer(_Inferencer):
    """Run a model exported with ``dmdd export --format openvino`` (``model.xml`` + ``model.bin`` + ``model.json``).

    Args:
        path: the ``.xml`` file; the JSON sidecar beside it gives the input size and the thresholds.
        device: OpenVINO device name (``CPU``, ``GPU``, ``AUTO``).
        threads: inference threads on CPU (``None``: OpenVINO's default).
        precision: CPU inference precision, ``f32`` (default: the exported model's own numbers) or ``bf16``
            (faster on CPUs with bf16 instructions; moves the maps, so re-check thresholds before relying on it).
    """

    def __init__(
        self, path: str | Path, device: str = "CPU", threads: int | None = None, precision: str = "f32"
    ) -> None:
        try:
            import openvino as ov
        except ImportError as exc:  # an optional dependency
            raise ImportError("OpenVINO is not installed: pip install 'dmdd[openvino]'") from exc
        self.path = Path(path)
        meta = self._sidecar()
        if meta is None:
            raise ValueError(f"{self.path} has no {self.path.stem}.json beside it (written by dmdd export)")
        self._setup(meta)
        config = {"INFERENCE_NUM_THREADS": threads} if threads and device == "CPU" else {}
        # Explicit precision: OpenVINO's CPU plugin would otherwise pick bf16 where the CPU has it.
        if device == "CPU":
            if precision not in ("f32", "bf16"):
                raise ValueError(f"precision must be f32 or bf16, got {precision!r}")
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = ov.Core().compile_model(str(self.path), device, config)
        self.request = self.compiled.create_infer_request()

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.request.infer({"images": np.ascontiguousarray(images, dtype=np.float32)})
        return out["pred_score"].copy(), out["anomaly_map"].copy()
