"""Probe: which image-threshold rule keeps false alarms on good *test* images near the target, and how much does
each rule detect? Scores of a checkpoint with ``model.global_score`` fitted are split into their two standardised
parts, z_map (the map's top-k score) and z_global (the pooled-feature distance), for the held-out good training
images, the training images the Gaussian was fitted on (scored out of fold, as ``FeatureGaussian.fit`` does), and
the test split. No rule looks at the test split; it is only used to report what each rule gives.

Also per teacher stage (fitted here on all four, whatever the checkpoint uses): the median z of the good test images
(the shift of a new capture) and the image AUROC of that stage's distance alone; and for the stage sets 1-4, 2-4,
3-4 and 4 the image AUROC of max(z_map, z_global), the decisions at 1 % and 5 % targets (today's rule), and the best
share flagged at <= 10 % false alarms on the good test images (a test-set figure, for reference).

Example:
    python benchmarks/calibration_probe.py runs/mt/refit.pt --category magnetic_tile --out runs/mt/calib.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from common import checkpoint_parser, open_checkpoint
from scipy.stats import norm

from dmdd import metrics
from dmdd.data import load_category
from dmdd.engine import split_holdout
from dmdd.evaluation import _image_batches, normal_threshold
from dmdd.models.global_score import ledoit_wolf, precision as _inverse, mahalanobis, out_of_fold, pool


@torch.inference_mode()
def parts(model, records, cfg):
    """(z_map, z_global, pooled features per stage) of ``records``."""
    g = model.global_score
    m_mean, m_std, g_mean, g_std = g.score_stats.double().tolist()
    zm, zg, pooled = [], [], [[] for _ in range(4)]
    for x in _image_batches(records, cfg, 16):
        feats = model.features(x)
        out = model.fuse(model.stack(*model.stage_maps(feats), x.shape[-2:]))
        zm.append((out.pred_score.double() - m_mean) / m_std)
        zg.append((g.distance(feats.teacher).double() - g_mean) / g_std)
        for i, z in enumerate(pool(feats.teacher, g.pooling)):
            pooled[i].append(z.double())
    return torch.cat(zm).numpy(), torch.cat(zg).numpy(), [torch.cat(p) for p in pooled]


def stage_distances(fit, others, folds=5):
    """Per stage: the fit images' distances out of fold (as ``FeatureGaussian.fit``), and each of ``others``'
    distances to the Gaussian of all fit images."""
    out = []
    for i, z in enumerate(fit):
        loc, cov, _ = ledoit_wolf(z)
        precision = _inverse(cov)
        out.append([out_of_fold(z, folds).numpy()] + [mahalanobis(o[i], loc, precision).numpy() for o in others])
    return out


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--targets", nargs="*", type=float, default=[0.01, 0.02, 0.05])
    args = p.parse_args(argv)
    model, _, cfg = open_checkpoint(args)
    g = model.global_score
    category = load_category(args.data, args.category)
    fit_records, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    hm, hg, hold_all = parts(model, holdout, cfg)
    _, _, fit_all = parts(model, fit_records, cfg)
    tm, tg, test_all = parts(model, category.test, cfg)
    per_stage = stage_distances(fit_all, [hold_all, test_all])  # [oof, held-out, test] per stage
    g_mean, g_std = g.score_stats[2:].double().tolist()
    og = (sum(per_stage[i][0] for i in g.stages) - g_mean) / g_std
    labels = np.asarray([r.label for r in category.test])
    types = np.asarray([r.defect_type for r in category.test])
    good = labels == 0

    def decide(flags):
        share = lambda keep: round(100 * float(flags[keep].mean()), 1)  # noqa: E731
        return {"flagged": share(~good), "false_alarms": share(good),
                "per_type": {str(t): share(types == t) for t in sorted(set(types) - {"good"})}}  # fmt: skip

    result = {"held_out": int(hm.size), "fit_images": int(og.size), "test_good": int(good.sum()),
              "test_defective": int((~good).sum()),
              "auroc": {"map": metrics.auroc(labels, tm), "global": metrics.auroc(labels, tg),
                        "max": metrics.auroc(labels, np.maximum(tm, tg)), "sum": metrics.auroc(labels, tm + tg)},
              "quantiles": {name: np.round(np.quantile(v, [0.5, 0.9, 0.95, 0.99, 1.0]), 2).tolist() for name, v in
                            [("held_map", hm), ("held_global", hg), ("oof_global", og),
                             ("test_good_map", tm[good]), ("test_good_global", tg[good])]},
              "rules": {}}  # fmt: skip
    for target in args.targets:
        rules = {
            # today: the combined max on the held-out images
            "heldout_max": decide(np.maximum(tm, tg) >= normal_threshold(np.maximum(hm, hg), target)),
            # each part at half the target; the global part's threshold from all training images out of fold
            "split_oof": decide((tm >= normal_threshold(hm, target / 2)) | (tg >= normal_threshold(og, target / 2))),
            "split_oof_pooled_global": decide(
                (tm >= normal_threshold(hm, target / 2)) | (tg >= normal_threshold(np.r_[og, hg], target / 2))
            ),
            # Gaussian tails on the standardised parts
            "gauss_tail": decide(np.maximum(tm, tg) >= norm.ppf(1 - target / 2)),
            "sum_heldout": decide(tm + tg >= normal_threshold(hm + hg, target)),
        }
        result["rules"][f"{target:g}"] = rules
        for name, r in rules.items():
            print(f"{target:g} {name:24s} flagged {r['flagged']:5.1f} false alarms {r['false_alarms']:5.1f}")
    result["stages"], result["stage_sets"] = {}, {}
    for i, (o, _, t) in enumerate(per_stage):
        z = (t - o.mean()) / o.std(ddof=1)
        result["stages"][i + 1] = {"test_good_median_z": round(float(np.median(z[good])), 2),
                                   "auroc": round(100 * metrics.auroc(labels, t), 1)}  # fmt: skip
    for stages in ((1, 2, 3, 4), (2, 3, 4), (3, 4), (4,)):
        o, h, t = (sum(per_stage[s - 1][j] for s in stages) for j in range(3))
        zt, zh = np.maximum(tm, (t - o.mean()) / o.std(ddof=1)), np.maximum(hm, (h - o.mean()) / o.std(ddof=1))
        row = {
            "auroc": round(100 * metrics.auroc(labels, zt), 1),
            "best_flagged_at_10pct_test_fa": round(100 * float((zt[~good] > np.quantile(zt[good], 0.9)).mean()), 1),
        }
        for target in (0.01, 0.05):
            row[f"{target:g}"] = decide(zt >= normal_threshold(zh, target))
        result["stage_sets"]["-".join(map(str, stages))] = row  # fmt: skip
    keys = ("held_out", "fit_images", "test_good", "test_defective", "auroc", "quantiles", "stages")
    print(json.dumps({k: result[k] for k in keys}))
    for name, row in result["stage_sets"].items():
        print(name, json.dumps(row))
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
