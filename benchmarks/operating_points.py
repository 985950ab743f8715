"""Decisions of a trained checkpoint on a test split at each stored operating point (normal-only, synthetic).

Prints, per threshold mode, the false-alarm rate on the good test images, the detection rate on the defective ones
(overall and per defect type), and the best detection rate the scores allow at the same false-alarm rate.

Example:
    python benchmarks/operating_points.py runs/tire/last.pt --category tire
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dmdd.checkpoint import config_of, restore_model
from dmdd.data import load_category
from dmdd.evaluation import operating_point, predict_split

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--category", required=True)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, payload = restore_model(args.checkpoint)
    cfg = config_of(payload)
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
