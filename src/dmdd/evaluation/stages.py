"""Which stages' maps the anomaly map adds up, chosen from a few labelled rejects with masks
(``dmdd calibrate --choose-stages``; a deviation, docs/deviations.md).

The plain sum of the standardised stage maps weighs every stage alike. Which stages carry a set's defects differs:
on tire the deepest stage's maps (8 x 8 at 256 px) spread every defect over a quarter of the tyre and the sum
without them localises better; on magnetic_tile the same stage is the best single one. Synthetic anomalies rank the
stages alike on both sets, so they cannot choose; a few real rejects with masks can.

The candidates are all of ``model.map_stages`` and each of them without one stage. For every candidate the maps'
statistics are refitted on the held-out good training images (as training fits them), the labelled images are
scored, and the candidate with the highest pixel AUROC over the labelled pixels (all pixels of the good images,
the masked defective images' pixels) is chosen; all stages stay unless another candidate is strictly better.
Measured with 10 + 10 labelled test images per draw in docs/results.md (section 5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdd.config import Config
from dmdd.data.datasets import Record
from dmdd.errors import DmddError
from dmdd.evaluation import metrics
from dmdd.evaluation.predictions import Predictions, preload_images, preload_tiles
from dmdd.evaluation.statistics import fit_map_statistics
from dmdd.models.dmdd import DMDD, fused_indices

ALL = "all"


def stage_candidates(cfg: Config) -> dict[str, tuple[int, ...] | None]:
    """``{"all": None, "without stage s": (...), ...}``: the fused stages each candidate adds up."""
    stages = cfg.model.map_stages
    out: dict[str, tuple[int, ...] | None] = {ALL: None}
    if len(stages) > 1:
        out |= {f"without stage {s}": tuple(t for t in stages if t != s) for s in stages}
    return out


def statistics_inputs(records: list[Record], cfg: Config, preload_max: int = 1024) -> list[Record] | torch.Tensor:
    """The held-out good images the maps' statistics are fitted on, as training fits them: decoded once when there
    are at most ``preload_max``; with tiles, a few tiles of each image."""
    if cfg.model.tile:
        return preload_tiles(records, cfg, min(256, max(64, 4 * len(records))))
    return preload_images(records, cfg) if len(records) <= preload_max else records


def use_stages(model: DMDD, cfg: Config, stages: tuple[int, ...] | None, stats_images, device: torch.device) -> Config:
    """Make ``model`` add up the maps of ``stages`` (``None``: all of ``map_stages``) and refit the statistics that
    depend on the sum (regional combination, the image score's standardisation). Returns the changed config."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fused_stages=stages))
    model.cfg = cfg.model
    model.fused = fused_indices(cfg.model)
    fit_map_statistics(model, stats_images, cfg, device)
    model.eval()
    return cfg


def labelled_pixel_auroc(p: Predictions, index: np.ndarray | None = None) -> float | None:
    """Pixel AUROC over the images (of ``index``, default all) whose pixels are known: good images, defective ones
    with a mask; ``None`` without a defect mask among them."""
    known = p.pixel_labelled()
    if index is not None:
        known = known & np.isin(np.arange(known.size), index)
    if not (known & (p.labels == 1)).any():
        return None
    return metrics.auroc(p.masks[known].ravel() > 0, p.maps[known].ravel())


def choose(scores: dict[str, float]) -> str:
    """The candidate with the highest score; ``all`` unless another is strictly better."""
    best = max(scores, key=lambda name: (scores[name], name == ALL))
    return best if scores[best] > scores[ALL] else ALL


def choose_stages(model: DMDD, cfg: Config, holdout: list[Record], predict: Callable[[Config], Predictions],
                  device: torch.device) -> tuple[Config, Predictions, dict[str, Any]]:  # fmt: skip
    """Score the labelled images (``predict``) with every candidate and keep the best; the model is left with the
    chosen stages and their refitted statistics.

    Returns:
        (the chosen config, its predictions of the labelled images, a report: candidates' pixel AUROC, chosen).
    """
    if model.segmentation is not None:
        raise DmddError("--choose-stages needs the plain-sum model (model.msn: false): the MSN weighs its maps itself")
    stats_images = statistics_inputs(holdout, cfg)
    runs: dict[str, tuple[Predictions, float]] = {}
    for name, stages in stage_candidates(cfg).items():
        c = use_stages(model, cfg, stages, stats_images, device)
        p = predict(c)
        auroc = labelled_pixel_auroc(p)
        if auroc is None:
            raise DmddError("--choose-stages needs masks of the defective images (--mask-dir): the stages are chosen "
                            "by how well the labelled defects' pixels are ranked")  # fmt: skip
        runs[name] = (p, auroc)
    chosen = choose({name: auroc for name, (_, auroc) in runs.items()})
    cfg = use_stages(model, cfg, stage_candidates(cfg)[chosen], stats_images, device)
    report = {"chosen": chosen, "fused_stages": list(cfg.model.fused_stages or cfg.model.map_stages),
              "labelled_pixel_auroc": {name: auroc for name, (_, auroc) in runs.items()},
              "holdout_images": len(holdout)}  # fmt: skip
    return cfg, runs[chosen][0], report


def training_holdout(cfg: Config, data_root: str | Path | None = None) -> list[Record]:
    """The held-out good training images of the run that wrote ``cfg`` (all training images when none were held
    out), found again from its data root (or ``data_root``) and seed."""
    from dmdd.data.datasets import load_category
    from dmdd.training.loop import split_holdout

    root = Path(data_root or cfg.data.root)
    try:
        category = load_category(root, cfg.data.category, cfg.data.layout)
    except (DmddError, FileNotFoundError) as exc:
        raise DmddError(f"--choose-stages refits the maps' statistics on the model's held-out good training images, "
                        f"but its training data could not be read at {root} ({exc}); pass --data-root DIR, the "
                        f"folder holding {cfg.data.category}/train/good") from None  # fmt: skip
    train, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    return holdout or train
