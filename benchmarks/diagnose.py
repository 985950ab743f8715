"""Where a model's anomaly maps go wrong: per map and per image region, beside peers on the same test images.

1. Per map (dmdd cells): the test split is scored once while the stacked, standardised maps (NGM and AIM, one per
   stage) and the regional map are kept; each single map and each subset is then fused as the model fuses (sum,
   regional map where fitted, the same smoothing) and scored with dmdd's metric code, over the split and per defect
   type: which stages and branches carry the localisation, of which defects, and what smoothing costs or gains.
2. Per region (any cell with ``predictions.npz``): every test image is cut into its background, a band along the
   foreground's edge (``--band`` of the image side) and the foreground's interior, using the foreground mask dmdd's
   synthesis uses (GrabCut, docs/method.md step 1). Per region: the share of good and defective pixels, the pixel
   AUROC inside the region, and at the threshold that flags 1 % of all good pixels, where those false alarms fall
   and how many defective pixels the region gets flagged.

Several dmdd cells (one per category) go into one file; a peer is matched to the dmdd cell of the same test images.

    python benchmarks/diagnose.py runs/benchmark/dev/{tire/tire,magnetic_tile/magnetic_tile}/dmdd-lite0-250steps-seed0 \
        --peer patchcore-lite0=runs/benchmark/ladder/tire/tire/patchcore-lite0-default-seed0 \
        --out docs/results/diagnose.json
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from common import parser

from dmdd.benchmark.cell import PREDICTIONS, load_predictions
from dmdd.checkpoint import config_of, restore_model
from dmdd.data import load_category
from dmdd.data.foreground import foreground_mask
from dmdd.data.io import read_image
from dmdd.device import select_device
from dmdd.evaluation import Predictions
from dmdd.evaluation.metrics import au_pro, auroc
from dmdd.evaluation.predictions import predict_split
from dmdd.models.segmentation import gaussian_blur

REGIONS = ("background", "edge", "interior")


def map_names(model) -> list[str]:
    stages = list(model.cfg.map_stages)
    branches = [b for b, on in (("NGM", model.pmn_normality is not None), ("AIM", model.pmn_abnormality is not None))
                if on]  # fmt: skip
    return [f"{b} s{s}" for b in branches for s in stages]


def capture_split(model, records, cfg, device) -> tuple[Predictions, torch.Tensor, torch.Tensor | None]:
    """Score the split as ``dmdd test`` does, keeping the stacked maps (N, K, S, S) and the regional map."""
    if model.segmentation is not None or cfg.model.tile:
        raise SystemExit("per-map analysis needs the plain-sum fusion without tiles (model.msn off, model.tile 0)")
    stacks, regionals, fuse = [], [], model.fused_map

    def keep(stacked: torch.Tensor, teacher=None) -> torch.Tensor:
        stacks.append(stacked.float().cpu())
        if model.regional is not None and teacher is not None:
            regionals.append(model.regional.raw_map(teacher, stacked.shape[-2:]).float().cpu())
        return fuse(stacked, teacher)

    model.fused_map = keep
    try:
        predictions = predict_split(model, records, cfg, device)
    finally:
        del model.fused_map
    return predictions, torch.cat(stacks), torch.cat(regionals) if regionals else None


def fuse_subset(model, stacked: torch.Tensor, regional: torch.Tensor | None, keep: list[int], sigma: float,
                size: int, support: bool = True) -> np.ndarray:  # fmt: skip
    """The model's fusion of the maps ``keep``: sum, regional map, smoothing, foreground support (where fitted and
    ``support``), at the evaluation size."""
    out = []
    for start in range(0, len(stacked), 16):
        m = stacked[start : start + 16, keep].sum(1, keepdim=True)
        if regional is not None:
            m = model.regional.combine(m, regional[start : start + 16])
        m = gaussian_blur(m, sigma) if sigma > 0 else m
        if support and model.support is not None:
            m = model.support(m)
        if m.shape[-1] != size:
            m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
        out.append(m[:, 0].numpy())
    return np.concatenate(out)


def pixel_metrics(predictions: Predictions, maps: np.ndarray) -> dict:
    """P-AUROC and AU-PRO over the split, and per defect type (its images with the good ones), where there are
    several types."""
    known = predictions.pixel_labelled()
    types = np.asarray(predictions.defect_types)

    def scored(index: np.ndarray) -> dict[str, float]:
        masks = predictions.masks[index] > 0
        return {"pixel_auroc": auroc(masks.ravel(), maps[index].ravel()), "au_pro": au_pro(masks, maps[index])}

    out = scored(known)
    kinds = sorted(set(types[known]) - {"good"})
    if len(kinds) > 1:
        out["per_type"] = {kind: scored(known & np.isin(types, ["good", kind])) for kind in kinds}
    return out


def per_map(model, predictions, stacked, regional, sigma: float) -> tuple[list[dict], np.ndarray | None]:
    """Rows of pixel metrics per fusion variant, and the maps without the foreground support (None without one)."""
    names, size = map_names(model), predictions.maps.shape[-1]
    every = list(range(len(names)))
    by_stage = {s: [i for i, n in enumerate(names) if n.endswith(f"s{s}")] for s in model.cfg.map_stages}
    # label -> (maps kept, with the regional map, smoothing sigma, with the foreground support)
    variants: dict[str, tuple[list[int], bool, float, bool]] = {"default (all maps)": (every, True, sigma, True)}
    if model.support is not None:
        variants["without the foreground support"] = (every, True, sigma, False)
    if regional is not None:
        variants["without the regional map"] = (every, False, sigma, True)
    for s, idx in by_stage.items():
        variants[f"without stage {s}"] = ([i for i in every if i not in idx], True, sigma, True)
    for branch in ("NGM", "AIM"):
        idx = [i for i, n in enumerate(names) if n.startswith(branch)]
        if idx and len(idx) < len(names):
            variants[f"{branch} only"] = (idx, True, sigma, True)
    for s, idx in by_stage.items():
        variants[f"stage {s} alone"] = (idx, False, sigma, True)
    if regional is not None:
        variants["regional map alone"] = ([], True, sigma, True)
    for other in (0.0, sigma * 2):
        variants[f"smoothing sigma {other:g}"] = (every, True, other, True)
    rows, unsupported = [], None
    for label, (keep, with_regional, s, with_support) in variants.items():
        maps = fuse_subset(model, stacked, regional if with_regional else None, keep, s, size, with_support)
        if label.startswith("default"):  # the capture reproduces the model's own maps
            assert np.allclose(maps, predictions.maps, atol=1e-3 * float(np.abs(maps).max())), "capture mismatch"
        if label == "without the foreground support":
            unsupported = maps
        rows.append({"variant": label, **pixel_metrics(predictions, maps)})
        kinds = " ".join(f"{k} {100 * m['pixel_auroc']:.2f}/{100 * m['au_pro']:.2f}"
                         for k, m in rows[-1].get("per_type", {}).items())  # fmt: skip
        print(f"{label:32s} P-AUROC {100 * rows[-1]['pixel_auroc']:.2f}  AU-PRO {100 * rows[-1]['au_pro']:.2f}  {kinds}",
              flush=True)  # fmt: skip
    return rows, unsupported


def region_masks(paths: list[str], size: int, cfg, band: float) -> np.ndarray:
    """(N, S, S) uint8: 0 background, 1 edge band, 2 interior, from each image's foreground mask."""
    width = max(1, round(band * size))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    out = np.zeros((len(paths), size, size), np.uint8)
    for i, path in enumerate(paths):
        fg = foreground_mask(read_image(path, size, "squash"), cfg.synthesis).astype(np.uint8)
        edge = cv2.dilate(fg, kernel) - cv2.erode(fg, kernel)
        out[i] = np.where(edge > 0, 1, np.where(fg > 0, 2, 0))
    return out


def per_region(name: str, predictions: Predictions, regions: np.ndarray) -> list[dict]:
    known = predictions.pixel_labelled()
    masks, maps, regions = predictions.masks[known] > 0, predictions.maps[known], regions[known]
    threshold = float(np.quantile(maps[~masks], 0.99))  # flags 1 % of all good pixels
    flagged_good = (maps >= threshold) & ~masks
    rows = []
    for code, region in enumerate(REGIONS):
        inside = regions == code
        good, bad = inside & ~masks, inside & masks
        rows.append({
            "model": name, "region": region,
            "good_pixel_share": float(good.sum() / (~masks).sum()),
            "defect_pixel_share": float(bad.sum() / max(masks.sum(), 1)),
            "pixel_auroc": auroc(masks[inside], maps[inside]) if good.any() and bad.any() else None,
            "false_alarm_share": float((flagged_good & inside).sum() / max(flagged_good.sum(), 1)),
            "false_alarm_rate": float((flagged_good & inside).sum() / max(good.sum(), 1)),
            "defect_recall": float(((maps >= threshold) & bad).sum() / bad.sum()) if bad.any() else None,
        })  # fmt: skip
    return rows


def diagnose_cell(cell: Path, peers: dict[str, Predictions], band: float) -> dict:
    ckpt = cell / "run" / "last.pt"
    model, payload = restore_model(ckpt)
    cfg = config_of(payload, ckpt)
    category = load_category(cfg.data.root, cfg.data.category, cfg.data.layout)
    predictions, stacked, regional = capture_split(model, category.test, cfg, select_device("cpu"))
    maps, unsupported = per_map(model, predictions, stacked, regional, cfg.model.map_sigma)
    regions = region_masks(predictions.paths, predictions.maps.shape[-1], cfg, band)
    rows = per_region(cell.name, predictions, regions)
    if unsupported is not None:
        rows += per_region(f"{cell.name} without the support", dataclasses.replace(predictions, maps=unsupported),
                           regions)  # fmt: skip
    for name, theirs in peers.items():
        if theirs.paths == predictions.paths and theirs.maps.shape == predictions.maps.shape:
            rows += per_region(name, theirs, regions)
    return {"category": cfg.data.category, "cell": str(cell), "maps": maps, "regions": rows,
            "defect_pixel_share": defect_pixel_share(predictions)}  # fmt: skip


def defect_pixel_share(predictions: Predictions) -> dict[str, float]:
    """Each defect type's share of the split's defective pixels: what weighs in the pixel AUROC."""
    known = predictions.pixel_labelled()
    types = np.asarray(predictions.defect_types)[known]
    per_image = (predictions.masks[known] > 0).reshape(int(known.sum()), -1).sum(1)
    return {kind: float(per_image[types == kind].sum() / per_image.sum()) for kind in sorted(set(types) - {"good"})}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("cells", nargs="+", help="finished dmdd benchmark cell folders (with run/last.pt)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=CELL", help="a cell with predictions.npz")
    p.add_argument("--band", type=float, default=0.04, help="edge band half-width, share of the image side")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peers = {}
    for peer in args.peer:
        name, _, folder = peer.partition("=")
        peers[name] = load_predictions(Path(folder) / PREDICTIONS)
    sets = [diagnose_cell(Path(cell), peers, args.band) for cell in args.cells]
    matched = {r["model"] for s in sets for r in s["regions"]}
    if set(peers) - matched:
        raise SystemExit(f"no dmdd cell scored the same test images as {sorted(set(peers) - matched)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"band": args.band, "git_commit": commit, "sets": sets}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
