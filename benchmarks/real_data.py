"""Train and evaluate DMDD on a real category of ../shared/data; record metrics, wall time and peak memory.

Example:
    python benchmarks/real_data.py --category tire --epochs 10 --out runs/tire_lite0
    python benchmarks/real_data.py --category tire --epochs 10 --set model.msn=false --out runs/tire_nomsn
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch
from common import add_data_args, parse_overrides, parser

from dmdd.checkpoint import restore_model
from dmdd.config import Config
from dmdd.data import load_category
from dmdd.engine import fit, select_device, split_holdout
from dmdd.evaluation import evaluate, fit_map_statistics
from dmdd.models import DMDD


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    add_data_args(p)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=100, help="training length unless --steps or --minutes is given")
    p.add_argument("--steps", type=int, default=0, help="training length in student steps")
    p.add_argument("--minutes", type=float, default=0.0, help="training length as a wall-clock budget")
    p.add_argument("--snapshot-every", type=int, default=0, help="keep a model copy every N steps (learning curves)")
    p.add_argument("--set", action="append", default=[], help="SECTION.OPTION=VALUE, e.g. train.lr_pretrained=1e-4")
    p.add_argument("--out", required=True)
    p.add_argument("--also-without-msn", action="store_true", help="also evaluate the plain-sum (w/o MSN) variant")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.set)
    cfg = Config().replace(
        model={"backbone": args.backbone, **overrides.get("model", {})},
        train={
            "epochs": args.epochs,
            "steps": args.steps,
            "minutes": args.minutes,
            "snapshot_every": args.snapshot_every,
            "num_threads": args.threads,
            **overrides.get("train", {}),
        },  # fmt: skip
        synthesis={"texture_dir": str(Path(args.data) / "textures" / "dtd10"), **overrides.get("synthesis", {})},
        data={"root": args.data, "category": args.category},
    )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ckpt = fit(cfg, args.out, resume=True, progress=sys.stderr.isatty())
    train_s = time.perf_counter() - start
    model, payload = restore_model(ckpt, select_device(cfg.train.device))
    start = time.perf_counter()
    test = load_category(args.data, args.category).test
    result, _ = evaluate(model, cfg, test, args.out, title=args.category, thresholds=payload.get("thresholds"))
    eval_s = time.perf_counter() - start
    without_msn = None
    if args.also_without_msn and cfg.model.msn:
        # The "w/o MSN" row: the same trained student, anomaly map = plain sum of the eight maps, score = max.
        # Student training never depends on the MSN (separate RNG streams), so this equals a run with msn off.
        plain_cfg = cfg.replace(model={"msn": False})
        plain = DMDD(dataclasses.replace(plain_cfg.model, pretrained=False))
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("segmentation.", "map_"))}
        plain.load_state_dict(state, strict=False)
        # Its maps are not pyramid-fused, so their statistics are refitted on the same held-out good images.
        holdout = split_holdout(load_category(args.data, args.category).train, cfg.train.holdout_fraction,
                                cfg.train.seed)[1]  # fmt: skip
        fit_map_statistics(plain, holdout, plain_cfg, torch.device("cpu"))
        without_msn, _ = evaluate(
            plain.eval(), plain_cfg, test, Path(args.out) / "without_msn", args.category + " w/o MSN"
        )
    record = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "category": args.category,
        "epochs": args.epochs,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "thresholds": payload.get("thresholds"),
        "overall": result["overall"],
        "operating_point": result.get("operating_point"),
        "per_defect_type": result["per_defect_type"],
        "without_msn": without_msn,
        "config": cfg.to_dict(),
    }
    Path(args.out, "benchmark.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: record[k] for k in ("category", "epochs", "train_seconds", "peak_rss_mib", "overall")}))
    if without_msn:
        print(json.dumps({"without_msn": without_msn["overall"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
