"""Evaluation loop, threshold calibration without test labels, and metric reports (DESIGN §6-7)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.config import Config
from dmdd.data.datasets import AnomalyDataset, PairDataset, Record
from dmdd.data.foreground import ForegroundCache
from dmdd.data.io import read_image
from dmdd.data.synthesis import AnomalySynthesizer
from dmdd.models.dmdd import DMDD, Features
from dmdd.visualize import heatmap_panel

CALIBRATION_STREAM = 10_000  # rng stream of the synthetic anomalies used for calibration


@dataclass
class Predictions:
    """Model outputs on a labelled split, at the evaluation size.

    Attributes:
        scores: (N,) image scores.
        maps: (N, E, E) anomaly maps.
        masks: (N, E, E) ground truth.
        labels: (N,) 0 normal, 1 anomalous.
        defect_types: N names.
        paths: N image paths.
        has_mask: (N,) whether the image's ground truth is known per pixel (good images always; defect images
            only with a mask file); ``None``: all.
    """

    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    defect_types: list[str]
    paths: list[str]
    has_mask: np.ndarray | None = None
    resize: str = "squash"

    def pixel_labelled(self) -> np.ndarray:
        return np.ones(self.labels.size, bool) if self.has_mask is None else np.asarray(self.has_mask, bool)


@torch.inference_mode()
def run_model(model: DMDD, images: torch.Tensor, device: torch.device, size: int | None = None):
    """Eval forward on a batch of (B, 3, S, S) images -> (scores (B,), maps (B, size, size)) as numpy."""
    out = model(images.to(device))
    maps = out.anomaly_map
    if size is not None and maps.shape[-1] != size:
        maps = torch.nn.functional.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
    return out.pred_score.float().cpu().numpy(), maps[:, 0].float().cpu().numpy()


def predict_split(model: DMDD, records: list[Record], cfg: Config, device: torch.device, batch_size: int = 8):
    """Run the model over a labelled split; masks are read at ``cfg.train.eval_size`` (nearest)."""
    model.eval()
    eval_size = cfg.train.eval_size
    data = AnomalyDataset(records, cfg.model.image_size, mask_size=eval_size, resize=cfg.model.resize)
    scores, maps, masks, labels, types, paths, has_mask = [], [], [], [], [], [], []
    for batch in DataLoader(data, batch_size=batch_size, num_workers=cfg.train.num_workers):
        has_mask.append(np.asarray(batch["has_mask"], bool))
        s, m = run_model(model, batch["image"], device, eval_size)
        scores.append(s)
        maps.append(m.astype(np.float32))
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        labels.append(np.asarray(batch["label"]))
        types += list(batch["defect_type"])
        paths += list(batch["path"])
    return Predictions(np.concatenate(scores), np.concatenate(maps), np.concatenate(masks), np.concatenate(labels),
                       types, paths, np.concatenate(has_mask), cfg.model.resize)  # fmt: skip


def preload_images(records: list[Record], cfg: Config) -> torch.Tensor:
    """The images of ``records`` decoded once at the model size: (N, 3, S, S) uint8 (what :class:`AnomalyDataset`
    yields, times 255), for passes repeated every epoch."""
    size, mode = cfg.model.image_size, cfg.model.resize
    images = [torch.tensor(read_image(r.image, size, mode)).permute(2, 0, 1) for r in records]
    return torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)


def _image_batches(images: list[Record] | torch.Tensor, cfg: Config, batch_size: int) -> Iterator[torch.Tensor]:
    """(B, 3, S, S) float images in [0, 1] from records (decoded by a DataLoader) or a :func:`preload_images`
    tensor (the same values)."""
    if isinstance(images, torch.Tensor):
        for start in range(0, len(images), batch_size):
            yield images[start : start + batch_size].float() / 255.0
        return
    data = AnomalyDataset(images, cfg.model.image_size, resize=cfg.model.resize)
    for batch in DataLoader(data, batch_size=batch_size, num_workers=cfg.train.num_workers):
        yield batch["image"]


@torch.inference_mode()
def fit_map_statistics(
    model: DMDD, images: list[Record] | torch.Tensor, cfg: Config, device: torch.device, batch_size: int = 8
):
    """Set ``model.map_mean`` / ``model.map_std`` to each map's mean and standard deviation over every pixel of
    the given good images (held-out training images: no test data; records, or :func:`preload_images` of them), and
    the residual head's ``sum_weights`` so that its base is the plain sum of its input maps (standardised maps when
    ``model.map_normalization``), itself standardised on the same pixels. With ``model.regional`` fitted, also the
    pixel statistics that add its map to the model's; with ``model.global_score`` fitted, the standardisation of
    the map's image score. Returns (mean (K,), std (K,))."""
    was_training = model.training
    model.eval()
    k = model.num_maps
    regional = model.regional is not None and model.regional.gaussian_fitted > 0
    # The plain sum is linear in the K maps, and so is the smoothing: the smoothed map's pixel statistics follow from
    # those of the K smoothed maps, in this same pass. The MSN's output is not: it takes a pass of its own below.
    linear = regional and model.segmentation is None
    total, smoothed_total = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    moments = torch.zeros(k, k, dtype=torch.float64)  # sum of m m^T over pixels
    smoothed_moments = torch.zeros(k, k, dtype=torch.float64)
    regional_sums = torch.zeros(2, dtype=torch.float64)  # the smoothed regional map: sum, sum of squares
    count = 0
    for batch in _image_batches(images, cfg, batch_size):
        feats = model.features(batch.to(device))
        maps = model.stack(*model.stage_maps(feats), batch.shape[-2:], normalized=False)  # (B, K, S, S)
        total += maps.double().sum(dim=(0, 2, 3)).cpu()
        moments += _gram(maps)
        count += maps[:, 0].numel()
        if linear:
            smoothed = model.smooth(maps.flatten(0, 1)[:, None]).view_as(maps)
            smoothed_total += smoothed.double().sum(dim=(0, 2, 3)).cpu()
            smoothed_moments += _gram(smoothed)
            other = model.smooth(model.regional.raw_map(feats.teacher, batch.shape[-2:])).double()
            regional_sums += torch.stack([other.sum(), (other * other).sum()]).cpu()
    mean = total / count
    std = (moments.diagonal() / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    model.map_mean.copy_(mean.float())
    model.map_std.copy_(std.float())
    a = 1.0 / std if model.cfg.map_normalization else torch.ones_like(std)  # the fusion's input is a * (m - mu)
    head = model.segmentation
    if head is not None and getattr(head, "residual", False):
        covariance = moments / count - torch.outer(mean, mean)
        plain_std = abs(float(a @ covariance @ a)) ** 0.5
        head.sum_weights.fill_(1.0 / max(plain_std, 1e-6))
    if linear:  # the plain map is sum_k a_k (smooth(m_k) - mu_k), with mu = 0 without map normalisation
        shift = float(a @ mean) if model.cfg.map_normalization else 0.0
        smoothed_mean = smoothed_total / count
        plain_mean = float(a @ smoothed_mean) - shift
        plain_var = float(a @ (smoothed_moments / count) @ a - (a @ smoothed_mean) ** 2)
        r_mean = float(regional_sums[0] / count)
        r_var = float(regional_sums[1] / count) - r_mean**2
        model.regional.fit_pixel_stats((plain_mean, max(plain_var, 0.0) ** 0.5), (r_mean, max(r_var, 0.0) ** 0.5))
    elif regional:  # the MSN's map and the regional map, from the statistics fitted above
        sums, pixels = torch.zeros(2, 2, dtype=torch.float64), 0  # (model, regional) x (sum, sum of squares)
        for feats, size in _feature_batches(model, images, cfg, device, batch_size):
            plain = model.fused_map(model.stack(*model.stage_maps(feats), size)).double()
            other = model.smooth(model.regional.raw_map(feats.teacher, size)).double()
            sums += torch.stack([torch.stack([m.sum(), (m * m).sum()]) for m in (plain, other)]).cpu()
            pixels += plain.numel()
        means = sums[:, 0] / pixels
        stds = (sums[:, 1] / pixels - means**2).clamp_min(0).sqrt()
        model.regional.fit_pixel_stats((float(means[0]), float(stds[0])), (float(means[1]), float(stds[1])))
    if model.global_score is not None and model.global_score.gaussian_fitted > 0:
        map_scores = [model.map_score(model.fused_map(model.stack(*model.stage_maps(feats), size), feats.teacher))
                      for feats, size in _feature_batches(model, images, cfg, device, batch_size)]  # fmt: skip
        model.global_score.fit_score_stats(torch.cat(map_scores).cpu())
    model.train(was_training)
    return mean.float(), std.float()


def _gram(maps: torch.Tensor) -> torch.Tensor:
    """(K, K) sum over pixels of m m^T for (B, K, S, S) maps, in float64 on the CPU."""
    flat = maps.double().transpose(0, 1).reshape(maps.shape[1], -1).cpu()
    return flat @ flat.T


def _feature_batches(model: DMDD, images: list[Record] | torch.Tensor, cfg: Config, device: torch.device,
                     batch_size: int) -> Iterator[tuple[Features, tuple[int, int]]]:  # fmt: skip
    """(features, input size) of each batch of ``images``."""
    for batch in _image_batches(images, cfg, batch_size):
        yield model.features(batch.to(device)), tuple(batch.shape[-2:])


@torch.inference_mode()
def fit_regional_score(model: DMDD, records: list[Record], cfg: Config, device: torch.device, per_image: int = 24,
                       batch_size: int = 16) -> dict[int, float]:  # fmt: skip
    """Fit ``model.regional``'s Gaussians to ``per_image`` window vectors drawn at random positions of each of the
    training images ``records`` (generator seeded by ``cfg.train.seed``; the teacher is frozen, so this needs no
    training). Returns the Ledoit-Wolf shrinkage per stage."""
    if model.regional is None:
        return {}
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.train.seed)
    vectors: dict[int, list[torch.Tensor]] = {s: [] for s in model.regional.windows}
    for batch in _image_batches(records, cfg, batch_size):
        teacher = model.teacher_features(model.normalize(batch.to(device)))
        for stage, v in model.regional.window_vectors(teacher).items():
            pick = torch.randint(0, v.shape[1], (v.shape[0], per_image), generator=gen).to(v.device)
            vectors[stage].append(torch.gather(v, 1, pick[..., None].expand(-1, -1, v.shape[2])).flatten(0, 1).cpu())
    shrinkage = model.regional.fit({s: torch.cat(v) for s, v in vectors.items()})
    model.train(was_training)
    return shrinkage


@torch.inference_mode()
def fit_global_score(model: DMDD, records: list[Record], cfg: Config, device: torch.device, batch_size: int = 16):
    """Fit ``model.global_score``'s Gaussians to the pooled teacher features of ``records`` (the training images;
    the teacher is frozen, so this needs no training) and the standardisation of their distance (out of sample);
    the map score's statistics follow in :func:`fit_map_statistics`.
    Returns the Ledoit-Wolf shrinkage per stage."""
    if model.global_score is None:
        return []
    was_training = model.training
    model.eval()
    pooled: list[list[torch.Tensor]] = [[] for _ in model.global_score.stages]
    for batch in _image_batches(records, cfg, batch_size):
        feats = model.teacher_features(model.normalize(batch.to(device)))
        for i, z in enumerate(model.global_score.pooled(feats)):
            pooled[i].append(z.double().cpu())
    shrinkages = model.global_score.fit([torch.cat(z) for z in pooled])  # on the CPU, in float64
    model.train(was_training)
    return shrinkages


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


def _youden_threshold(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """Threshold ``score >= t`` maximising TPR - FPR between two score samples."""
    labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
    fpr, tpr, thr = metrics.roc_curve(labels, np.r_[normal, anomalous])
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thr[best])


def normal_threshold(normal: np.ndarray, target_fpr: float) -> float:
    """Smallest sample quantile that leaves at most ``target_fpr`` of the good-sample scores above it (``score >= t``
    is anomalous): with few held-out images this is their maximum or close to it."""
    flat = np.sort(np.asarray(normal, dtype=np.float64).ravel())
    allowed = int(np.floor(target_fpr * flat.size))  # samples that may lie strictly above the threshold
    return float(np.nextafter(flat[flat.size - 1 - allowed], np.inf))


@torch.inference_mode()
def calibrate(model: DMDD, records: list[Record], cfg: Config, device: torch.device) -> dict[str, Any]:
    """Image and pixel thresholds from held-out good training images (and synthetic anomalies made from them).

    No test image or label is involved. Both operating points are computed and stored; ``cfg.train.threshold_mode``
    picks the one used by default:

    - ``normal``: the image threshold leaves ``target_fpr`` of the held-out good images above it, the pixel
      threshold ``pixel_target_fpr`` of their pixels;
    - ``synthetic``: the image threshold maximises TPR - FPR between good images and synthetic anomalies, the pixel
      threshold maximises pixel F1 on the synthetic masks.
    """
    model.eval()
    synthesizer = AnomalySynthesizer(cfg.synthesis)
    pairs = PairDataset(records, cfg.model.image_size, synthesizer, cfg.train.seed, ForegroundCache(cfg.synthesis),
                        cfg.model.resize)  # fmt: skip
    pairs.set_epoch(0, CALIBRATION_STREAM)
    normal_scores, anomalous_scores, normal_maps, anomalous_maps, anomalous_masks = [], [], [], [], []
    for start in range(0, len(pairs), 8):
        batch = [pairs[i] for i in range(start, min(start + 8, len(pairs)))]
        normal = torch.stack([b[0] for b in batch])
        anomalous = torch.stack([b[1] for b in batch])
        s_n, m_n = run_model(model, normal, device)
        s_a, m_a = run_model(model, anomalous, device)
        normal_scores.append(s_n)
        anomalous_scores.append(s_a)
        normal_maps.append(m_n)
        anomalous_maps.append(m_a)
        anomalous_masks.append(torch.stack([b[2] for b in batch])[:, 0].numpy().astype(bool))
    normal_s, anomalous_s = np.concatenate(normal_scores), np.concatenate(anomalous_scores)
    normal_m, anomalous_m, masks = map(np.concatenate, (normal_maps, anomalous_maps, anomalous_masks))
    t = cfg.train
    by_normal = {"image": normal_threshold(normal_s, t.target_fpr),
                 "pixel": normal_threshold(normal_m, t.pixel_target_fpr),
                 "target_fpr": t.target_fpr, "pixel_target_fpr": t.pixel_target_fpr}  # fmt: skip
    pixel_maps, pixel_masks = np.concatenate([normal_m, anomalous_m]), np.concatenate([np.zeros_like(masks), masks])
    by_synthetic = {
        "image": _youden_threshold(normal_s, anomalous_s),
        "pixel": metrics.f1_max(pixel_masks, pixel_maps)[1] if masks.any() else by_normal["pixel"],
    }
    chosen = by_normal if t.threshold_mode == "normal" else by_synthetic
    labels = np.r_[np.zeros(normal_s.size), np.ones(anomalous_s.size)]
    return {
        "image": chosen["image"],
        "pixel": chosen["pixel"],
        "mode": t.threshold_mode,
        "normal": by_normal,
        "synthetic": by_synthetic,
        "normal_images": int(normal_s.size),
        "synthetic_anomalies": int(anomalous_s.size),
        # Label-free validation figures (held-out normals vs synthetic anomalies), usable for model choices.
        "synthetic_image_auroc": metrics.auroc(labels, np.r_[normal_s, anomalous_s]),
        "synthetic_pixel_auroc": metrics.auroc(pixel_masks, pixel_maps) if masks.any() else None,
        "source": "held-out good training images and synthetic anomalies made from them (no test data)",
    }


def operating_point(p: Predictions, threshold: float) -> dict[str, Any]:
    """Decisions ``score >= threshold`` on a labelled split: false alarms on good images, detections per type."""
    flagged = p.scores >= threshold
    types = np.asarray(p.defect_types)
    good = p.labels == 0
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "false_alarm_rate": float(flagged[good].mean()) if good.any() else None,
        "detection_rate": float(flagged[~good].mean()) if (~good).any() else None,
        "good_images": int(good.sum()),
        "defective_images": int((~good).sum()),
        "per_defect_type": {t: float(flagged[types == t].mean()) for t in sorted(set(types) - {"good"})},
    }
    if good.any() and (~good).any():  # the best detection rate the scores allow at the same false-alarm rate
        allowed = int(np.floor(out["false_alarm_rate"] * good.sum()))
        best_t = np.sort(p.scores[good])[good.sum() - 1 - allowed] if allowed < good.sum() else -np.inf
        out["best_detection_rate_at_same_false_alarms"] = float((p.scores[~good] > best_t).mean())
    return out


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
            "target_fpr", cfg.train.target_fpr), **operating_point(predictions, thresholds["image"])}  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        write_metrics(result, out, title)
        if overlays_per_type:
            write_overlays(predictions, records, out / "overlays", overlays_per_type)
    return result, predictions
