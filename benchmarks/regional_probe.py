"""Probe: a *regional* feature-statistics map for defects that change an area a little (magnetic_tile "uneven").

The global image score (``model.global_score``) pools the teacher's features over the whole image; here they are
pooled over a window around every position instead (per-channel mean and standard deviation of stage 2 and 3
features over a k x k window), and each window is scored by its Mahalanobis distance to one Gaussian fitted on
windows of the training images (positions pooled: no alignment assumed; Ledoit-Wolf shrinkage). The map is
upsampled, smoothed like the model's, standardised by its pixel mean and std on the held-out good images, and
combined with the model's own map (standardised the same way) by sum or maximum. With ``--cells G`` the positions
are split into a G x G grid of cells with one Gaussian each (for objects, whose background and part windows differ).

Example:
    python benchmarks/regional_probe.py runs/mt/last.pt --category magnetic_tile --out runs/mt/regional.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.engine import split_holdout
from dmdd.models.global_score import ledoit_wolf
from dmdd.models.regional import WINDOWS as REGIONAL_WINDOWS
from dmdd.models.regional import local_stats
from dmdd.models.segmentation import gaussian_blur

WINDOWS = {stage - 1: k for stage, k in REGIONAL_WINDOWS.items()}  # 0-based stage index -> window side in cells


def cell_index(h: int, w: int, cells: int) -> torch.Tensor:
    """(H * W,) grid cell of every position of an H x W stage map."""
    rows = torch.arange(h)[:, None] * cells // h
    cols = torch.arange(w)[None, :] * cells // w
    return (rows * cells + cols).flatten()


@torch.inference_mode()
def passes(model, records, cfg, fits=None, sample=None, gen=None, cells=1):
    """Either collect sampled window vectors per stage and cell (``fits`` None) or return (model maps, regional
    maps)."""
    data = AnomalyDataset(records, cfg.model.image_size, mask_size=cfg.train.eval_size, resize=cfg.model.resize)
    vectors = {(i, c): [] for i in WINDOWS for c in range(cells * cells)}
    maps, regional, masks, labels, types = [], [], [], [], []
    size = cfg.model.image_size
    for batch in DataLoader(data, batch_size=8):
        images = batch["image"]
        teacher = model.teacher_features(model.normalize(images))
        if fits is None:
            for i, k in WINDOWS.items():
                v = local_stats(teacher[i], k).flatten(2).transpose(1, 2)  # (B, HW, 2C)
                where = cell_index(*teacher[i].shape[-2:], cells)
                for c in range(cells * cells):
                    vc = v[:, where == c]
                    pick = torch.randint(0, vc.shape[1], (vc.shape[0], sample), generator=gen)
                    vectors[i, c].append(torch.gather(vc, 1, pick[..., None].expand(-1, -1, vc.shape[2])).flatten(0, 1))
            continue
        total = 0
        for i, k in WINDOWS.items():
            v = local_stats(teacher[i], k).flatten(2).transpose(1, 2)  # (B, HW, 2C)
            where = cell_index(*teacher[i].shape[-2:], cells)
            d = torch.zeros(v.shape[:2])
            for c in range(cells * cells):
                loc, prec = fits[i, c]
                diff = v[:, where == c] - loc
                d[:, where == c] = ((diff @ prec) * diff).sum(-1).clamp_min(0).sqrt()
            d = d.view(v.shape[0], 1, *teacher[i].shape[-2:])
            total = total + F.interpolate(d, size=(size, size), mode="bilinear", align_corners=False)
        regional.append(gaussian_blur(total, cfg.model.map_sigma)[:, 0].numpy())
        maps.append(model(images).anomaly_map[:, 0].numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        labels.append(np.asarray(batch["label"]))
        types += list(batch["defect_type"])
    if fits is None:
        return {key: torch.cat(v) for key, v in vectors.items()}
    cat = np.concatenate
    return cat(maps), cat(regional), cat(masks), cat(labels), types


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--sample", type=int, default=24, help="window vectors per training image and cell")
    p.add_argument("--cells", type=int, default=1, help="G: a G x G grid of Gaussians (1: one for all positions)")
    args = p.parse_args(argv)
    model, _, cfg = open_checkpoint(args)
    category = load_category(args.data, args.category)
    train, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    gen = torch.Generator().manual_seed(0)
    vectors = passes(model, train, cfg, sample=args.sample, gen=gen, cells=args.cells)
    fits = {}
    for (i, c), v in vectors.items():
        loc, cov, a = ledoit_wolf(v)
        fits[i, c] = (loc.float(), torch.linalg.inv(cov).float())
        if c == 0:
            print(f"stage {i + 1}, cell 0: {v.shape[0]} windows of {v.shape[1]} dims, shrinkage {a:.3f}")
    hold_map, hold_reg, *_ = passes(model, holdout, cfg, fits, cells=args.cells)
    test_map, test_reg, masks, labels, types = passes(model, category.test, cfg, fits, cells=args.cells)
    z = lambda m, h: (m - h.mean()) / (h.std() + 1e-12)  # noqa: E731
    zm, zr = z(test_map, hold_map), z(test_reg, hold_reg)
    variants = {"model": zm, "regional": zr, "sum": zm + zr, "max": np.maximum(zm, zr)}
    result = {}
    uneven = np.asarray([t in ("good", "uneven") for t in types])
    for name, m in variants.items():
        row = {"pixel_auroc": metrics.auroc(masks, m), "au_pro": metrics.au_pro(masks, m)}
        if "uneven" in types:
            row["uneven_pixel_auroc"] = metrics.auroc(masks[uneven], m[uneven])
        result[name] = {k: round(100 * v, 2) for k, v in row.items()}
        print(name, json.dumps(result[name]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
