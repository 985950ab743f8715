"""Prediction on unlabelled images: scores, decisions with the calibrated thresholds, maps, overlays, masks."""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from dmdd.checkpoint import restore_model
from dmdd.data.datasets import to_tensor
from dmdd.data.geometry import from_square, to_square
from dmdd.data.io import IMAGE_SUFFIXES, MAX_DECODE_PIXELS, TILED_DECODE_PIXELS, list_images, read_image
from dmdd.data.tiles import TileSpec, score_tiled
from dmdd.device import select_device
from dmdd.errors import DmddError, ImageReadError
from dmdd.evaluation import run_model
from dmdd.evaluation.labelled import describe
from dmdd.evaluation.visualize import threshold_overlay


@dataclass
class ImageResult:
    """One predicted image: score, decision and written files."""

    path: str
    score: float
    anomalous: bool
    anomalous_area: float  # share of pixels above the pixel threshold
    overlay: str
    mask: str


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files, folders (their images, sorted) and glob patterns -> (image paths, problems with inputs)."""
    paths: list[Path] = []
    problems: list[dict[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += list_images(p)
        elif p.is_file():
            paths.append(p)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            paths += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
            if not matches:
                problems.append({"path": item, "error": "the pattern matches no file"})
        else:
            problems.append({"path": item, "error": "no such file or folder"})
    unique = list(dict.fromkeys(paths))
    return unique, problems


def optimise_for_inference(model: torch.nn.Module, channels_last: bool, compile: bool) -> torch.nn.Module:
    """Channels-last weights and optional ``torch.compile`` (defaults chosen by a probe, docs/probes.md)."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


class Predictor:
    """Load a checkpoint once, then score images.

    Args:
        checkpoint: a ``last.pt`` written by training.
        device: ``auto``, ``cpu``, ``cuda``...
        image_threshold: overrides the calibrated image threshold.
        pixel_threshold: overrides the calibrated pixel threshold.
        channels_last: channels-last memory format (default: 1.9x faster on CPU, maps within 4e-6 of contiguous).
        bf16: bfloat16 autocast (CPU and CUDA): 2.2x faster again on CPU, but maps moved by up to 0.34 on a
            trained tire model, so it is off by default (docs/results.md).
        compile: ``torch.compile`` the model (1.5x faster than channels-last eager, slow first call).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "auto",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        channels_last: bool = True,
        bf16: bool = False,
        compile: bool = False,
    ) -> None:
        self.device = select_device(device)
        model, payload = restore_model(checkpoint, self.device)
        self.model = optimise_for_inference(model, channels_last, compile)
        self.bf16 = bf16
        self.channels_last = channels_last
        self.image_size = model.cfg.image_size
        self.resize = model.cfg.resize
        self.tiles = TileSpec.of(model.cfg)
        self.reduce_above = MAX_DECODE_PIXELS if self.tiles is None else TILED_DECODE_PIXELS
        calibrated = payload.get("thresholds") or {}
        self.image_threshold = image_threshold if image_threshold is not None else calibrated.get("image")
        self.pixel_threshold = pixel_threshold if pixel_threshold is not None else calibrated.get("pixel")
        self.threshold_source = "given: --threshold" if image_threshold is not None else describe(calibrated)
        if self.image_threshold is None or self.pixel_threshold is None:
            raise DmddError(
                f"checkpoint {checkpoint} holds no calibrated thresholds (training did not finish); "
                "pass --threshold and --pixel-threshold or finish training with --resume"
            )

    def score(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 images at the model size -> (scores (N,), maps (N, S, S))."""
        batch = torch.stack([to_tensor(im) for im in images])
        if self.channels_last:
            batch = batch.to(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return run_model(self.model, batch, self.device)

    def score_full(self, images: list[np.ndarray], batch_size: int = 8) -> list[tuple[float, np.ndarray]]:
        """(score, map at the image's own size) of (H, W, 3) uint8 images: one batch of squares, or each image tile
        by tile (batches of ``batch_size`` tiles) when the model was trained on tiles."""
        if self.tiles is not None:
            return [score_tiled(im, self.tiles, self.image_size, lambda t: self.score(list(t)), batch_size)
                    for im in images]  # fmt: skip
        scores, maps = self.score([to_square(im, self.image_size, self.resize) for im in images])
        return [(float(s), from_square(m, im.shape[:2], self.resize)) for s, m, im in zip(scores, maps, images)]

    def predict_files(
        self,
        paths: list[Path],
        out_dir: str | Path,
        batch_size: int = 8,
        failures: list[dict[str, str]] | None = None,
    ):
        """Score files, write overlay and mask PNGs per image plus ``results.csv`` / ``results.json``.

        Each file is decoded once (huge images already reduced while decoding). Unreadable files do not stop the
        run; they are listed under ``failed`` after any ``failures`` passed in (e.g. inputs that did not exist).

        Returns:
            (results, failures).
        """
        out = Path(out_dir)
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
        results: list[ImageResult] = []
        failures = list(failures or [])
        for start in range(0, len(paths), batch_size):
            loaded = []
            for path in paths[start : start + batch_size]:
                try:
                    loaded.append((path, read_image(path, reduce_above=self.reduce_above)))
                except ImageReadError as exc:
                    failures.append({"path": str(path), "error": exc.reason})
            if not loaded:
                continue
            for (path, image), (score, full_map) in zip(loaded, self.score_full([im for _, im in loaded], batch_size)):
                results.append(self._write(path, image, score, full_map, out, len(results)))
        self.write_summaries(results, failures, out)
        return results, failures

    def _write(self, path: Path, image: np.ndarray, score: float, full_map: np.ndarray, out: Path, index: int):
        """Overlay and mask at the decoded image's size (the original size unless it was reduced as huge)."""
        mask = full_map >= self.pixel_threshold
        stem = f"{index:05d}_{path.stem}"
        overlay_path, mask_path = out / "overlays" / f"{stem}.png", out / "masks" / f"{stem}.png"
        painted = threshold_overlay(image, full_map, self.pixel_threshold)
        cv2.imwrite(str(overlay_path), cv2.cvtColor(painted, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(mask_path), mask.astype(np.uint8) * 255)
        return ImageResult(str(path), score, bool(score >= self.image_threshold), float(mask.mean()),
                           str(overlay_path), str(mask_path))  # fmt: skip

    def write_summaries(self, results: list[ImageResult], failures: list[dict[str, str]], out: Path) -> None:
        """Write ``results.json`` and ``results.csv`` (one row per image, then one per failure)."""
        summary = {
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "threshold_source": self.threshold_source,
            "images": [asdict(r) for r in results],
            "failed": failures,
        }
        (out / "results.json").write_text(json.dumps(summary, indent=2))
        with (out / "results.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ImageResult.__dataclass_fields__) + ["error"])
            writer.writeheader()
            for r in results:
                writer.writerow(asdict(r) | {"error": ""})
            for fail in failures:
                writer.writerow({"path": fail["path"], "error": fail["error"]})
