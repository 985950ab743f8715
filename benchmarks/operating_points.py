"""Decisions of a trained checkpoint on a test split at each stored operating point (normal-only, synthetic).

Prints, per threshold mode, the false-alarm rate on the good test images, the detection rate on the defective ones
(overall and per defect type), and the best detection rate the scores allow at the same false-alarm rate. With
``--targets``, also the normal-only threshold for each of these false-alarm targets on the held-out good training
images (what ``train.target_fpr`` would have stored).

Example:
    python benchmarks/operating_points.py runs/tire/last.pt --category tire
"""

from __future__ import annotations

import json

import torch
from common import checkpoint_parser, open_checkpoint

from dmdd import metrics
from dmdd.data import load_category
from dmdd.engine import split_holdout
from dmdd.evaluation import normal_threshold, operating_point, predict_split


def main(argv: list[str] | None = None) -> int:
    p = checkpoint_parser(__doc__)
    p.add_argument("--targets", nargs="*", type=float, default=[], help="false-alarm targets, e.g. 0.01 0.05")
    args = p.parse_args(argv)
    model, payload, cfg = open_checkpoint(args)
    thresholds = payload.get("thresholds") or {}
    category = load_category(args.data, args.category)
    predictions = predict_split(model, category.test, cfg, torch.device("cpu"))
    out = {}
    for mode in ("normal", "synthetic"):
        if mode in thresholds:
            out[mode] = operating_point(predictions, thresholds[mode]["image"])
    if args.targets:
        train, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
        held = predict_split(model, holdout or train, cfg, torch.device("cpu")).scores
        for target in args.targets:
            out[f"normal_target_{target:g}"] = operating_point(predictions, normal_threshold(held, target))
    auroc = metrics.auroc(predictions.labels, predictions.scores)
    print(json.dumps({"checkpoint": args.checkpoint, "image_auroc": auroc, "default_mode": thresholds.get("mode"),
                      **out}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
