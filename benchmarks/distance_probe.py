"""Probe: does the cosine distance miss defects that change feature magnitude? Cosine vs magnitude-aware maps.

For each stage and branch the eight cosine maps (the paper's D), the same pairs compared by the squared L2
distance of the features, and a magnitude map ``|log(|s| / |t|)|`` (how far the student's feature norm is from the
teacher's, blind to direction). Every map is standardised on the held-out good images; the fusions scored per
defect type (I-AUROC with the top-100 image score, P-AUROC, AU-PRO) on the test split:

- ``cosine``: the eight cosine maps summed (dmdd's default map); ``l2``: the eight L2 maps summed;
- ``cosine+magnitude``: the cosine sum plus all eight magnitude maps;
- ``cosine+stable_magnitude``: plus only the magnitude maps whose held-out tail (99.9th percentile of the
  standardised map) is no heavier than that of the cosine map of the same stage and branch: a magnitude term only
  where good images show it is as stable as the cosine;
- ``cosine_positional``: each cosine map standardised per position by the held-out mean and a shrunk std
  (``sqrt(var_position + var_map)``), summed.

Only held-out good images choose or scale anything. Also printed: the mean standardised value of each map over the
good *test* images (0 when they sit where the held-out good images do). A diagnostic, not a fusion dmdd uses.

    python benchmarks/distance_probe.py runs/curve_magnetic_tile/default.pt --category magnetic_tile --threads 1
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from fusion_study import per_map, smooth
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.engine import split_holdout
from dmdd.models.segmentation import top_k_score


@torch.inference_mode()
def maps_of(model, records, size: int):
    """(cosine, L2, magnitude maps, each (N, 8, S, S); masks (N, S, S); labels (N,))."""
    cos, l2, mag, masks, labels = [], [], [], [], []
    for batch in DataLoader(AnomalyDataset(records, size, mask_size=size), batch_size=8):
        feats = model.features(batch["image"])
        pairs = [(t, s) for branch in (feats.normality, feats.abnormality) for t, s in zip(feats.teacher, branch)]
        up = lambda m: F.interpolate(m, size=(size, size), mode="bilinear")  # noqa: E731
        cos.append(torch.cat([up(1 - F.cosine_similarity(t, s, dim=1).unsqueeze(1)) for t, s in pairs], 1).numpy())
        l2.append(torch.cat([up(((t - s) ** 2).mean(1, keepdim=True)) for t, s in pairs], 1).numpy())
        log_ratio = [(s.norm(dim=1, keepdim=True) + 1e-6).log() - (t.norm(dim=1, keepdim=True) + 1e-6).log()
                     for t, s in pairs]  # fmt: skip
        mag.append(torch.cat([up(r.abs()) for r in log_ratio], 1).numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        labels.append(batch["label"].numpy())
    return [np.concatenate(x) for x in (cos, l2, mag, masks, labels)]


def z_sum(maps: np.ndarray, hold: np.ndarray, keep: np.ndarray | None = None, positional: bool = False) -> np.ndarray:
    """(N, S, S): the sum over the kept maps of each map standardised on the held-out images, in chunks of images.

    ``positional``: per position, by the held-out mean there and a std shrunk towards the map's overall std
    (``sqrt(var_position + var_map)``)."""
    keep = np.ones(maps.shape[1], dtype=bool) if keep is None else keep
    mean, std = per_map(hold, "z")
    if positional:
        mean, std = hold.mean(0), np.sqrt(hold.var(0) + std[:, None, None] ** 2)
    else:
        mean, std = mean[:, None, None], std[:, None, None]
    return np.concatenate([((maps[i : i + 32] - mean) / std)[:, keep].sum(1) for i in range(0, len(maps), 32)])


def fusions(hold: dict, test: dict, sigma: float) -> tuple[dict[str, np.ndarray], list[bool]]:
    """The fused maps of the module docstring, and which magnitude maps the stability rule kept."""

    def tail(h: np.ndarray) -> np.ndarray:  # 99.9th percentile of each standardised held-out map
        mean, std = per_map(h, "z")
        return (np.quantile(h.transpose(1, 0, 2, 3).reshape(h.shape[1], -1), 0.999, axis=1) - mean) / std

    stable = tail(hold["magnitude"]) <= tail(hold["cosine"])
    cos = z_sum(test["cosine"], hold["cosine"])
    return {
        "cosine": smooth(cos, sigma),
        "l2": smooth(z_sum(test["l2"], hold["l2"]), sigma),
        "cosine+magnitude": smooth(cos + z_sum(test["magnitude"], hold["magnitude"]), sigma),
        "cosine+stable_magnitude": smooth(cos + z_sum(test["magnitude"], hold["magnitude"], stable), sigma),
        "cosine_positional": smooth(z_sum(test["cosine"], hold["cosine"], positional=True), sigma),
    }, stable.tolist()


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args(argv)
    model, _, cfg = open_checkpoint(args)
    category = load_category(args.data, args.category)
    _, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    size = cfg.model.image_size
    names = ("cosine", "l2", "magnitude")
    hold = dict(zip(names, maps_of(model, holdout, size)[:3], strict=True))
    *test_maps, masks, labels = maps_of(model, category.test, size)
    fused, stable = fusions(hold, dict(zip(names, test_maps, strict=True)), cfg.model.map_sigma)
    print("magnitude maps kept by the stability rule (ngm1-4, aim1-4):", stable)
    # Do good *test* images sit where the held-out good images do? Mean standardised value per map (0: no shift).
    shift = {}
    for name, m in zip(names, test_maps, strict=True):
        mean, std = per_map(hold[name], "z")
        shift[name] = ((m[labels == 0].mean(axis=(0, 2, 3)) - mean) / std).round(2).tolist()
    print("mean standardised value of the good test images per map:", json.dumps(shift))
    types = np.array([r.defect_type for r in category.test])
    result = {"stable_magnitude_maps": stable, "good_test_shift": shift}
    for name, m in fused.items():
        scores = top_k_score(torch.from_numpy(m[:, None]), cfg.model.top_k).numpy()
        row = {"overall": [metrics.auroc(labels, scores), metrics.auroc(masks, m), metrics.au_pro(masks, m)]}
        for t in sorted(set(types[labels == 1])):
            keep = (types == t) | (labels == 0)
            row[t] = [metrics.auroc(labels[keep], scores[keep]), metrics.auroc(masks[keep], m[keep]),
                      metrics.au_pro(masks[keep], m[keep])]  # fmt: skip
        result[name] = {k: [round(100 * v, 1) for v in vs] for k, vs in row.items()}
        print(name, json.dumps(result[name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
