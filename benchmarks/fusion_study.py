"""Fusion and image-score study: which normal-only combination of the eight maps serves real defects best.

One pass of a trained student over its held-out good training images and over the test split gives the eight raw
maps (cached in ``OUT/maps_*.npy`` so that reruns only re-score). Every candidate below uses statistics of the
held-out good images only; the test split is scored, never used to fit anything.

Map fusions (each smoothed with the model's ``map_sigma`` after fusing):
- ``sum_z``: each map standardised by its mean / std over held-out pixels, summed (the default since issue 11);
- ``max_z``: the largest of the eight standardised maps at each pixel;
- ``sum_tail`` / ``max_tail``: each map scaled to its held-out tail, ``(m - median) / (q99.9 - median)``: 1 means
  "as high as the top 0.1 % of good pixels" for every map alike;
- ``sum_logz``: standardised logarithms summed (a geometric mean of the maps, as STFPM multiplies its layers).

Image scores, for each fusion:
- ``max``: the largest value of the fused map (the default);
- ``top100``: the mean of its 100 largest values (the paper's top-k image score on the MSN output);
- ``per_map_z``: every map's own smoothed maximum standardised by the mean / std of that maximum over the
  held-out images, summed over the eight maps (a fusion at image level; independent of the map fusion, reported once).

Example:
    python benchmarks/fusion_study.py runs/curve_tire/last.pt --category tire --out runs/curve_tire/fusion
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from common import add_data_args, parser
from learning_curve import raw_and_default

from dmdd import metrics
from dmdd.checkpoint import config_of, restore_model
from dmdd.data import load_category
from dmdd.engine import split_holdout
from dmdd.models.segmentation import gaussian_blur


def cached_maps(out: Path, ckpt: Path, category) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, float]:
    """(held-out raw maps, test raw maps, test masks, test labels, map_sigma), computed once and cached in OUT."""
    model, payload = restore_model(ckpt)
    cfg = config_of(payload, ckpt)
    files = {name: out / f"maps_{name}.npy" for name in ("hold", "test", "masks", "labels")}
    if not all(f.is_file() for f in files.values()):
        _, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
        hold = raw_and_default(model, holdout, cfg.model.image_size, cfg.train.eval_size, False)[2]
        _, _, test, masks, labels = raw_and_default(
            model, category.test, cfg.model.image_size, cfg.train.eval_size, True
        )
        for name, array in zip(files, (hold, test, masks, labels)):
            np.save(files[name], array)
    hold, test, masks, labels = (np.load(files[n], mmap_mode="r") for n in ("hold", "test", "masks", "labels"))
    return np.asarray(hold), np.asarray(test), np.asarray(masks), np.asarray(labels), cfg.model.map_sigma


def smooth(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of (N, H, W) maps, as the model does it."""
    if sigma <= 0:
        return maps
    out = [gaussian_blur(torch.from_numpy(np.ascontiguousarray(maps[i : i + 16, None])), sigma)[:, 0].numpy()
           for i in range(0, len(maps), 16)]  # fmt: skip
    return np.concatenate(out)


def per_map(hold: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Shift and scale (K,) of each map from the held-out pixels: mean / std (``z``) or median / q99.9 (``tail``)."""
    flat = hold.transpose(1, 0, 2, 3).reshape(hold.shape[1], -1)
    if kind == "z":
        return flat.mean(1), flat.std(1) + 1e-12
    median, top = np.quantile(flat, [0.5, 0.999], axis=1)
    return median, top - median + 1e-12


def fused(maps: np.ndarray, shift: np.ndarray, scale: np.ndarray, how: str) -> np.ndarray:
    """(N, K, H, W) -> (N, H, W), standardised per map, then summed or maximised."""
    out = []
    for i in range(0, len(maps), 16):
        z = (maps[i : i + 16] - shift[None, :, None, None]) / scale[None, :, None, None]
        out.append(z.sum(1) if how == "sum" else z.max(1))
    return np.concatenate(out)


def image_level_z(hold: np.ndarray, test: np.ndarray, sigma: float) -> np.ndarray:
    """Sum over maps of each map's smoothed image maximum, standardised on the held-out images -> (N,)."""

    def maxima(maps: np.ndarray) -> np.ndarray:
        return np.stack([smooth(maps[:, k], sigma).reshape(len(maps), -1).max(1) for k in range(maps.shape[1])], 1)

    h, t = maxima(hold), maxima(test)
    return ((t - h.mean(0)) / (h.std(0) + 1e-12)).sum(1)


def evaluate(labels, masks, maps, scores) -> dict:
    return {"image_auroc": metrics.auroc(labels, scores), "pixel_auroc": metrics.auroc(masks, maps),
            "au_pro": metrics.au_pro(masks, maps)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("checkpoint")
    add_data_args(p)
    p.add_argument("--out", required=True, help="folder for the cached maps and fusion.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    hold, test, masks, labels, sigma = cached_maps(out, Path(args.checkpoint), load_category(args.data, args.category))
    print(f"maps ready in {time.perf_counter() - start:.0f} s: held-out {hold.shape}, test {test.shape}", flush=True)
    results: dict = {"checkpoint": args.checkpoint, "category": args.category}
    with np.errstate(divide="ignore"):
        log_hold, log_test = np.log(np.maximum(hold, 1e-6)), np.log(np.maximum(test, 1e-6))
    candidates = {
        "sum_z": (test, per_map(hold, "z"), "sum"),
        "max_z": (test, per_map(hold, "z"), "max"),
        "sum_tail": (test, per_map(hold, "tail"), "sum"),
        "max_tail": (test, per_map(hold, "tail"), "max"),
        "sum_logz": (log_test, per_map(log_hold, "z"), "sum"),
    }
    for name, (maps, (shift, scale), how) in candidates.items():
        fused_map = smooth(fused(maps, shift, scale, how), sigma)
        flat = fused_map.reshape(len(fused_map), -1)
        top100 = np.sort(flat, axis=1)[:, -100:].mean(1)
        row = evaluate(labels, masks, fused_map, flat.max(1))
        row["image_auroc_top100"] = metrics.auroc(labels, top100)
        results[name] = row
        print(name, {k: round(100 * v, 1) for k, v in row.items()}, flush=True)
    results["per_map_z_image_auroc"] = metrics.auroc(labels, image_level_z(hold, test, sigma))
    print("per_map_z image AUROC", round(100 * results["per_map_z_image_auroc"], 1))
    results["seconds"] = round(time.perf_counter() - start, 1)
    (out / "fusion.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
