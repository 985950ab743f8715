"""AU-PRO: dmdd.metrics.au_pro versus anomalib's AUPRO on the same maps (values and seconds).

    .venv-anomalib/bin/python benchmarks/aupro_speed.py --checkpoint runs/tire_lite0_lr1e-4/last.pt
Maps: the checkpoint's predictions on the tire test set at 256 px (112 x 256 x 256). Median of 5 runs each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmdd import metrics
from dmdd.checkpoint import config_of, load_checkpoint, restore_model
from dmdd.data import load_category
from dmdd.evaluation import predict_split

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def median_time(fn, repeats: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return float(value), float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(2)
    cfg = config_of(load_checkpoint(args.checkpoint))
    model, _ = restore_model(args.checkpoint)
    pred = predict_split(model, load_category(DATA / "tire").test, cfg, torch.device("cpu"))
    masks, maps = pred.masks, pred.maps
    ours, ours_s = median_time(lambda: metrics.au_pro(masks, maps), args.repeats)
    fpr, pro = metrics.pro_curve(masks, maps)
    full = metrics.trapezoid_to(fpr, pro, 0.3) / 0.3
    result = {"maps": list(maps.shape), "dmdd_au_pro": ours, "dmdd_full_curve_au_pro": full, "dmdd_seconds": ours_s}
    try:
        from anomalib.metrics.aupro import _AUPRO
    except ImportError:
        result["anomalib"] = "not installed in this environment"
    else:

        def theirs():
            metric = _AUPRO(fpr_limit=0.3)
            metric.update(torch.from_numpy(maps), torch.from_numpy(masks.astype(np.int64)))
            return metric.compute()

        value, seconds = median_time(theirs, args.repeats)
        result |= {"anomalib_au_pro": value, "anomalib_seconds": seconds, "speedup": seconds / ours_s}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
