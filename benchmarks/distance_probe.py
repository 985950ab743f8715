"""Probe: does the cosine distance miss defects that change feature magnitude? Cosine vs L2 maps, per defect type.

For each stage and branch the eight cosine maps (the paper's D) and the same pairs compared by the squared L2
distance of the features; each map standardised on the held-out good images, summed, smoothed like the default,
scored per defect type (P-AUROC, AU-PRO) on the test split. A diagnostic, not a fusion dmdd uses.

    python benchmarks/distance_probe.py runs/curve_magnetic_tile/default.pt --category magnetic_tile --threads 1
"""

from __future__ import annotations

import json

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.engine import split_holdout
from dmdd.models.segmentation import gaussian_blur


@torch.inference_mode()
def maps_of(model, records, size: int):
    """(cosine maps (N, 8, S, S), L2 maps (N, 8, S, S), masks (N, S, S))."""
    cos, l2, masks = [], [], []
    for batch in DataLoader(AnomalyDataset(records, size, mask_size=size), batch_size=8):
        feats = model.features(batch["image"])
        pairs = [(t, s) for branch in (feats.normality, feats.abnormality) for t, s in zip(feats.teacher, branch)]
        up = lambda m: F.interpolate(m, size=(size, size), mode="bilinear")  # noqa: E731
        cos.append(torch.cat([up(1 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)) for t, s in pairs], 1).numpy())
        l2.append(torch.cat([up(((t - s) ** 2).mean(1, keepdim=True)) for t, s in pairs], 1).numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
    return np.concatenate(cos), np.concatenate(l2), np.concatenate(masks)


def fuse(maps: np.ndarray, hold: np.ndarray, sigma: float) -> np.ndarray:
    mean, std = hold.mean(axis=(0, 2, 3)), hold.std(axis=(0, 2, 3)) + 1e-12
    z = ((maps - mean[None, :, None, None]) / std[None, :, None, None]).sum(1, keepdims=True)
    return gaussian_blur(torch.from_numpy(z), sigma)[:, 0].numpy()


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    args = p.parse_args(argv)
    model, _, cfg = open_checkpoint(args)
    category = load_category(args.data, args.category)
    _, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    size = cfg.model.image_size
    hold_cos, hold_l2, _ = maps_of(model, holdout, size)
    cos, l2, masks = maps_of(model, category.test, size)
    fused = {"cosine": fuse(cos, hold_cos, cfg.model.map_sigma), "l2": fuse(l2, hold_l2, cfg.model.map_sigma)}
    types = np.array([r.defect_type for r in category.test])
    labels = np.array([r.label for r in category.test])
    result = {}
    for name, m in fused.items():
        row = {"overall": [metrics.auroc(masks, m), metrics.au_pro(masks, m)]}
        for t in sorted(set(types[labels == 1])):
            keep = (types == t) | (labels == 0)
            row[t] = [metrics.auroc(masks[keep], m[keep]), metrics.au_pro(masks[keep], m[keep])]
        result[name] = {k: [round(100 * v, 1) for v in vs] for k, vs in row.items()}
        print(name, json.dumps(result[name]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
