"""The models a server holds: trained checkpoints (PyTorch, :class:`dmdd.deploy.predict.Predictor`) or exported ONNX models
(:class:`dmdd.deploy.inference.OnnxInferencer`), one of them active."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dmdd.errors import DmddError


@dataclass
class Scored:
    """One image's score and anomaly map at the image's own size."""

    score: float
    anomaly_map: np.ndarray


@dataclass
class ServedModel:
    """A loaded model and what the app shows about it."""

    name: str
    path: Path
    runtime: str  # "pytorch" or "onnxruntime"
    backbone: str
    image_size: int
    resize: str
    image_threshold: float | None
    pixel_threshold: float | None
    training_data: str | None
    engine: Any = field(repr=False)
    threshold_source: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "runtime": self.runtime, "backbone": self.backbone,
                "image_size": self.image_size, "resize": self.resize, "image_threshold": self.image_threshold,
                "pixel_threshold": self.pixel_threshold, "threshold_source": self.threshold_source,
                "training_data": self.training_data}  # fmt: skip

    @property
    def reduce_above(self) -> int:
        """Images of more pixels are reduced while decoding; models on tiles keep more (``dmdd.data.io``)."""
        from dmdd.data.io import MAX_DECODE_PIXELS, TILED_DECODE_PIXELS

        return TILED_DECODE_PIXELS if getattr(self.engine, "tiles", None) is not None else MAX_DECODE_PIXELS

    def stored_thresholds(self) -> dict[str, Any] | None:
        """The thresholds in the checkpoint file as it is now (PyTorch models)."""
        from dmdd.checkpoint import load_checkpoint

        return load_checkpoint(self.path).get("thresholds")

    def set_thresholds(self, thresholds: dict[str, Any]) -> None:
        """Store new thresholds in the checkpoint (atomic write) and decide with them from now on."""
        from dmdd.checkpoint import load_checkpoint, save_checkpoint
        from dmdd.evaluation.labelled import describe

        with self.lock:
            stored = load_checkpoint(self.path)
            stored["thresholds"] = thresholds
            save_checkpoint(self.path, stored)
            self.image_threshold = self.engine.image_threshold = thresholds["image"]
            self.pixel_threshold = self.engine.pixel_threshold = thresholds["pixel"]
            self.threshold_source = self.engine.threshold_source = describe(thresholds)

    def score(self, images: list[np.ndarray]) -> list[Scored]:
        """(H, W, 3) uint8 RGB images of any size -> their scores and maps (one model call per batch)."""
        if not images:
            return []
        with self.lock:  # one forward at a time per model: the CPU threads are shared anyway
            # PyTorch (Predictor) or ONNX (dmdd.deploy.inference): the same geometry, squares or tiles
            return [Scored(s, np.asarray(m, np.float32)) for s, m in self.engine.score_full(images)]


def load_model(path: str | Path, device: str = "auto", name: str | None = None) -> ServedModel:
    """A ``last.pt`` checkpoint or an exported ``.onnx`` model (with its ``.json`` sidecar)."""
    path = Path(path)
    if not path.is_file():
        raise DmddError(f"model {path} not found: pass a checkpoint (last.pt) or an exported .onnx file")
    name = name or (path.parent.name if path.name == "last.pt" else path.stem)
    if path.suffix == ".onnx":
        from dmdd.deploy.inference import OnnxInferencer

        engine = OnnxInferencer(path)
        meta = engine.meta
        return ServedModel(name, path, "onnxruntime", meta.get("backbone", "?"), engine.image_size, engine.resize,
                           engine.image_threshold, engine.pixel_threshold, meta.get("training_data"),
                           engine, engine.threshold_source)  # fmt: skip
    from dmdd.checkpoint import config_of, load_checkpoint
    from dmdd.deploy.predict import Predictor

    engine = Predictor(path, device=device)
    cfg = config_of(load_checkpoint(path), path)
    root, category = cfg.data.root, cfg.data.category
    data = str(Path(root) / category) if root and category else root
    return ServedModel(name, path, "pytorch", cfg.model.backbone, cfg.model.image_size, cfg.model.resize,
                       engine.image_threshold, engine.pixel_threshold, data, engine,
                       engine.threshold_source)  # fmt: skip


class Registry:
    """Loaded models by name, and the active one."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self.models: dict[str, ServedModel] = {}
        self.active: str | None = None
        self._lock = threading.Lock()

    def add(self, path: str | Path, name: str | None = None, activate: bool = False) -> ServedModel:
        """Load a model; a name already taken by another file is an error (name it with ``NAME=PATH``)."""
        model = load_model(path, self.device, name)
        with self._lock:
            taken = self.models.get(model.name)
            if taken is not None and taken.path.resolve() != model.path.resolve():
                raise DmddError(f"two models are named {model.name!r} ({taken.path} and {model.path}): "
                                f"name them, e.g. {model.name}-2={model.path}")  # fmt: skip
            self.models[model.name] = model
            if activate or self.active is None:
                self.active = model.name
        return model

    def get(self, name: str | None = None) -> ServedModel:
        with self._lock:
            key = name or self.active
            if key is None or key not in self.models:
                raise KeyError(name or "no model loaded")
            return self.models[key]

    def activate(self, name: str) -> ServedModel:
        model = self.get(name)
        with self._lock:
            self.active = name
        return model
