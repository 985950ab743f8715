"""Metrics of a trained model on a labelled test split, per defect type, and the files `dmdd test` writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from dmdd.config import Config
from dmdd.data.datasets import Record
from dmdd.data.io import read_image
from dmdd.evaluation import metrics
from dmdd.evaluation.labelled import describe
from dmdd.evaluation.predictions import Predictions, predict_split
from dmdd.evaluation.thresholds import operating_point
from dmdd.evaluation.visualize import heatmap_panel
from dmdd.models.dmdd import DMDD


def _split_metrics(p: Predictions, index: np.ndarray) -> dict[str, float | None]:
    labels, scores = p.labels[index], p.scores[index]
    pixel_index = index[p.pixel_labelled()[index]]  # pixel metrics: images whose ground truth is known per pixel
    masks, maps = p.masks[pixel_index], p.maps[pixel_index]
    both = labels.min() == 0 and labels.max() == 1
    has_pixels = masks.any() and (~masks).any()
    return {
        "image_auroc": metrics.auroc(labels, scores) if both else None,
        "image_f1_max": metrics.f1_max(labels, scores)[0] if labels.max() == 1 else None,
        "pixel_auroc": metrics.auroc(masks, maps) if has_pixels else None,
        "pixel_f1_max": metrics.f1_max(masks, maps)[0] if has_pixels else None,
        "au_pro": metrics.au_pro(masks, maps) if has_pixels else None,
        "images": int(index.size),
        "defective_with_masks": int((p.labels[pixel_index] == 1).sum()),
        "defective": int((labels == 1).sum()),
    }


def compute_metrics(p: Predictions) -> dict[str, Any]:
    """Overall metrics and a per-defect-type breakdown (each type evaluated together with the good images)."""
    everything = np.arange(p.labels.size)
    good = np.flatnonzero(np.asarray(p.defect_types) == "good")
    per_type = {}
    for name in sorted(set(p.defect_types) - {"good"}):
        index = np.r_[good, np.flatnonzero(np.asarray(p.defect_types) == name)]
        per_type[name] = _split_metrics(p, np.sort(index))
    return {"overall": _split_metrics(p, everything), "per_defect_type": per_type}


def metrics_markdown(result: dict[str, Any], title: str) -> str:
    """A Markdown table: overall row then one row per defect type, values in %."""
    cols = ["image_auroc", "pixel_auroc", "au_pro", "image_f1_max", "pixel_f1_max", "images"]
    head = ["split", "I-AUROC", "P-AUROC", "AU-PRO", "I-F1max", "P-F1max", "images"]

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        return str(v) if isinstance(v, int) else f"{100 * v:.2f}"

    rows = [["**all**", *[fmt(result["overall"][c]) for c in cols]]]
    rows += [[name, *[fmt(m[c]) for c in cols]] for name, m in result["per_defect_type"].items()]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def write_overlays(p: Predictions, records: list[Record], out_dir: Path, per_type: int = 3) -> list[Path]:
    """Save image | ground truth | anomaly map panels for the first ``per_type`` test images of each type."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_path = {str(r.image): r for r in records}
    vmax = float(np.quantile(p.maps, 0.999)) or 1.0
    vmin = float(p.maps.min())
    written, seen = [], {}
    for i, path in enumerate(p.paths):
        kind = p.defect_types[i]
        if seen.get(kind, 0) >= per_type:
            continue
        seen[kind] = seen.get(kind, 0) + 1
        image = read_image(by_path[path].image, p.maps.shape[-1], p.resize)
        panel = heatmap_panel(image, p.masks[i], p.maps[i], vmin, vmax)
        target = out_dir / f"{kind}_{Path(path).stem}.png"
        cv2.imwrite(str(target), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        written.append(target)
    return written


def write_metrics(result: dict[str, Any], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    (out_dir / "metrics.md").write_text(metrics_markdown(result, title))


def evaluate(
    model: DMDD,
    cfg: Config,
    records: list[Record],
    out_dir: str | Path | None = None,
    title: str = "DMDD",
    device: torch.device | None = None,
    overlays_per_type: int = 3,
    thresholds: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], Predictions]:
    """Metrics of a trained model on a labelled test split; writes metrics.json, metrics.md and overlays.

    With the calibrated ``thresholds`` the result also holds the operating point: false-alarm rate on the good
    images and detection rate on the defective ones at the image threshold.

    Returns:
        (metrics, predictions).
    """
    device = device or next(model.parameters()).device
    predictions = predict_split(model, records, cfg, device)
    result = compute_metrics(predictions)
    if thresholds and thresholds.get("image") is not None:
        normal = thresholds.get("normal") or {}
        result["operating_point"] = {"mode": thresholds.get("mode", "synthetic"), "target_fpr": normal.get(
            "target_fpr", cfg.train.target_fpr), "threshold_source": describe(thresholds),
            **operating_point(predictions, thresholds["image"])}  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        write_metrics(result, out, title)
        if overlays_per_type:
            write_overlays(predictions, records, out / "overlays", overlays_per_type)
    return result, predictions
