"""Probe: does an image-level score from *pooled* teacher features add what the pixel maps miss (large, low-contrast
defects such as magnetic_tile's "uneven")?

The score is the Mahalanobis distance of each stage's spatially pooled teacher features (mean, and optionally the
per-channel standard deviation over positions) to a Gaussian fitted on the training images the student trained on
(Ledoit-Wolf shrinkage), summed over stages, with the pooling and estimator of ``dmdd.models.global_score`` (the
table in results §10 was measured with an earlier copy that took the sample standard deviation, N - 1; Rippel et
al., "Modeling the distribution of normal data in pre-trained deep features", 2020). The teacher is the frozen
ImageNet backbone, so no training image is scored by a model that saw it as a target. Both the model's own image
score and this one are standardised by their mean and std on the held-out good training images, never on the test
split; combinations are their sum and maximum.

Reported per variant: I-AUROC (overall and per defect type), the share of defective test images flagged at
thresholds set on the held-out images for 1, 2 and 5 % false-alarm targets with the false-alarm rate on good test
images,
and the best share the ranking allows at <= 10 % false alarms on good test images (a test-set figure, for reference).

Example:
    python benchmarks/global_score_probe.py runs/mt/last.pt --category magnetic_tile --out runs/mt/global.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from torch.utils.data import DataLoader

from dmdd import metrics
from dmdd.data import load_category
from dmdd.data.datasets import AnomalyDataset
from dmdd.engine import split_holdout
from dmdd.evaluation import predict_split
from dmdd.models.global_score import ledoit_wolf, mahalanobis, pool


@torch.inference_mode()
def pooled_features(model, records, cfg, pooling: str) -> list[torch.Tensor]:
    """Per stage, (N, C) or (N, 2C) pooled teacher features (the library's pooling)."""
    data = AnomalyDataset(records, cfg.model.image_size, resize=cfg.model.resize)
    out: list[list[torch.Tensor]] = [[] for _ in range(4)]
    for batch in DataLoader(data, batch_size=16):
        for i, z in enumerate(pool(model.teacher_features(model.normalize(batch["image"])), pooling)):
            out[i].append(z.double())
    return [torch.cat(o) for o in out]


def distances(fits, pooled) -> np.ndarray:
    """Sum over stages of the Mahalanobis distances to the fitted (mean, precision) pairs."""
    return sum(mahalanobis(z, loc, precision) for (loc, precision), z in zip(fits, pooled)).numpy()


def report(name: str, test: np.ndarray, hold: np.ndarray, labels: np.ndarray, types: list[str]) -> dict:
    good, bad = test[labels == 0], test[labels == 1]
    at = {}
    for target in (0.01, 0.02, 0.05):  # thresholds from the held-out good images alone
        threshold = float(np.quantile(hold, 1 - target))
        at[f"{100 * target:g}%"] = [round(100 * float((bad > threshold).mean()), 1),
                                    round(100 * float((good > threshold).mean()), 1)]  # fmt: skip
    best = float((bad > np.quantile(good, 0.9)).mean())
    per_type = {}
    for t in sorted(set(types) - {"good"}):
        keep = (labels == 0) | (np.asarray(types) == t)
        per_type[t] = round(100 * metrics.auroc(labels[keep], test[keep]), 1)
    row = {"image_auroc": round(100 * metrics.auroc(labels, test), 1), "per_type": per_type,
           "flagged_and_false_alarms_at_holdout_target": at,
           "best_flagged_at_10pct_test_fa": round(100 * best, 1)}  # fmt: skip
    print(name, json.dumps(row))
    return row


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model, _, cfg = open_checkpoint(args)
    category = load_category(args.data, args.category)
    fit_records, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    device = torch.device("cpu")
    own_test = predict_split(model, category.test, cfg, device)
    own_hold = predict_split(model, holdout, cfg, device).scores
    labels, types = own_test.labels, own_test.defect_types
    z = lambda s, h: (s - h.mean()) / (h.std() + 1e-12)  # noqa: E731
    result = {"own": report("own", z(own_test.scores, own_hold), z(own_hold, own_hold), labels, types)}
    for with_std in (False, True):
        pooling = "mean_std" if with_std else "mean"
        fits = [
            (loc, torch.linalg.inv(cov))
            for loc, cov, _ in map(ledoit_wolf, pooled_features(model, fit_records, cfg, pooling))
        ]
        g_test = distances(fits, pooled_features(model, category.test, cfg, pooling))
        g_hold = distances(fits, pooled_features(model, holdout, cfg, pooling))
        tag = "gauss_meanstd" if with_std else "gauss_mean"
        gt, gh = z(g_test, g_hold), z(g_hold, g_hold)
        ot, oh = z(own_test.scores, own_hold), z(own_hold, own_hold)
        result[tag] = report(tag, gt, gh, labels, types)
        result[tag + "+own"] = report(tag + "+own", gt + ot, gh + oh, labels, types)
        result[tag + "|own"] = report(tag + "|own", np.maximum(gt, ot), np.maximum(gh, oh), labels, types)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
