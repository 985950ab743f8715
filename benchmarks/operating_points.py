"""Decisions of a trained checkpoint on a test split at each stored operating point (normal-only, synthetic).

Prints, per threshold mode, the false-alarm rate on the good test images, the detection rate on the defective ones
(overall and per defect type), and the best detection rate the scores allow at the same false-alarm rate.

Example:
    python benchmarks/operating_points.py runs/tire/last.pt --category tire
"""

from __future__ import annotations

import json

import torch
from common import checkpoint_parser, open_checkpoint

from dmdd.data import load_category
from dmdd.evaluation import operating_point, predict_split


def main(argv: list[str] | None = None) -> int:
    args = checkpoint_parser(__doc__).parse_args(argv)
    model, payload, cfg = open_checkpoint(args)
    thresholds = payload.get("thresholds") or {}
    predictions = predict_split(model, load_category(args.data, args.category).test, cfg, torch.device("cpu"))
    out = {}
    for mode in ("normal", "synthetic"):
        if mode in thresholds:
            out[mode] = operating_point(predictions, thresholds[mode]["image"])
    print(json.dumps({"checkpoint": args.checkpoint, "default_mode": thresholds.get("mode"), **out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
