"""Give a trained student another fusion: new map statistics, a new segmentation head, a new global image score
(``model.global_score``), new thresholds.

The student, the PMN and the teacher of ``CHECKPOINT`` are kept as they are (student training never depends on
the fusion). With the changed model options (``--set model.map_stages=[2,3]``, ``--set model.msn_residual=false``,
...) the map statistics are refitted on the held-out good training images, the segmentation head is trained for as
many epochs, on the same per-epoch fresh pairs and with as many steps, as the original run's heads, and the
thresholds are calibrated again. The difference from training with these options from the start: every head epoch
sees the final student instead of the student of that epoch.

Example:
    python benchmarks/refit_fusion.py runs/tire/last.pt --set model.map_stages=[2,3] --out runs/tire/refit.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parse_overrides  # noqa: E402

from dmdd.checkpoint import config_of, load_checkpoint, save_checkpoint  # noqa: E402
from dmdd.data import load_category  # noqa: E402
from dmdd.data.datasets import PairDataset  # noqa: E402
from dmdd.data.foreground import ForegroundCache  # noqa: E402
from dmdd.data.synthesis import AnomalySynthesizer  # noqa: E402
from dmdd.distributed import DistContext, SegmentationObjective  # noqa: E402
from dmdd.engine import resolve_regional_score, split_holdout, train_segmentation_epoch  # noqa: E402
from dmdd.evaluation import calibrate, fit_global_score, fit_map_statistics, fit_regional_score  # noqa: E402
from dmdd.models import DMDD  # noqa: E402


def refit(checkpoint: Path, overrides: dict, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    payload = load_checkpoint(checkpoint)
    base = config_of(payload, checkpoint)
    cfg = base.replace(**overrides)
    category = load_category(cfg.data.root, cfg.data.category, cfg.data.layout)
    train, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    pairs = PairDataset(train, cfg.model.image_size, AnomalySynthesizer(cfg.synthesis), cfg.train.seed,
                        ForegroundCache(cfg.synthesis), cfg.model.resize)  # fmt: skip
    cfg = resolve_regional_score(cfg, pairs.policy)
    model = DMDD(dataclasses.replace(cfg.model, pretrained=False, weights=None))
    fitted_here = ("segmentation.", "map_", "global_score.", "regional.")
    kept = {k: v for k, v in payload["model"].items() if not k.startswith(fitted_here)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(fitted_here) for k in missing), (missing, unexpected)
    device = torch.device("cpu")
    start = time.perf_counter()
    fit_global_score(model, train, cfg, device)
    fit_regional_score(model, train, cfg, device)
    fit_map_statistics(model, holdout or train, cfg, device)
    epochs = int(payload["epoch"])
    if model.segmentation is not None:
        optimizer = torch.optim.Adam(model.segmentation.parameters(), lr=cfg.train.seg_lr)
        objective = SegmentationObjective(model)
        with tqdm(disable=not sys.stderr.isatty(), desc="head") as bar:
            for epoch in range(epochs):
                train_segmentation_epoch(model, objective, pairs, optimizer, cfg, device, epoch, bar, DistContext())
    thresholds = calibrate(model, holdout or train, cfg, device)
    seconds = time.perf_counter() - start
    save_checkpoint(out, {"config": cfg.to_dict(), "model": model.state_dict(), "epoch": epochs,
                          "step": payload.get("step", 0), "history": payload.get("history", []),
                          "thresholds": thresholds, "refit_from": str(checkpoint)})  # fmt: skip
    return {"checkpoint": str(out), "from": str(checkpoint), "overrides": overrides, "head_epochs": epochs,
            "seconds": round(seconds, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--set", action="append", default=[], help="SECTION.OPTION=VALUE, e.g. model.map_stages=[2,3]")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    print(json.dumps(refit(Path(args.checkpoint), parse_overrides(args.set), Path(args.out), args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
