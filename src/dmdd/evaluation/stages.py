"""Which stages' maps the anomaly map adds up, chosen from a few labelled rejects with masks
(``dmdd calibrate --choose-stages``; a deviation, docs/deviations.md).

The plain sum of the standardised stage maps weighs every stage alike. Which stages carry a set's defects differs:
on tire the deepest stage's maps (8 x 8 at 256 px) spread every defect over a quarter of the tyre and the sum
without them localises better; on magnetic_tile the same stage is the best single one. Synthetic anomalies rank the
stages alike on both sets, so they cannot choose; a few real rejects with masks can.

The candidates are all of ``model.map_stages`` and each of them without one stage. For every candidate the maps'
statistics are refitted on the held-out good training images (as training fits them) and the labelled images are
scored. Each masked reject then gives a paired measurement: the AUROC of its defect pixels against every normal
labelled pixel (the good images' and the rejects' own defect-free pixels), under the candidate minus under all
stages. A candidate replaces all stages only when its mean gain is positive and an exact one-sided sign-flip test
over the rejects finds it significant at 5 %, Bonferroni-corrected for the number of candidates; of those that
pass, the largest mean gain wins. A few rejects choose only what they can show: with 10 masked rejects on
magnetic_tile, where the candidates differ by less than a point, choosing the best pixel AUROC alone dropped all
stages in 20 of 20 draws and cost 0.2 P-AUROC and 0.5 AU-PRO on the rest of the split (docs/results.md, section 5).
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


SIGNIFICANCE = 0.05


def per_reject_auroc(p: Predictions, index: np.ndarray | None = None) -> np.ndarray:
    """For each masked defective image (of ``index``, default all): the AUROC of its defect pixels against every
    normal pixel of the images whose pixels are known (ties count half). Returns (R,)."""
    known = p.pixel_labelled()
    if index is not None:
        known = known & np.isin(np.arange(known.size), index)
    masks, maps = p.masks[known] > 0, p.maps[known]
    negatives = np.sort(maps[~masks])
    out = []
    for m, mask in zip(maps, masks):
        if not mask.any():
            continue
        positives = m[mask]
        below = np.searchsorted(negatives, positives, side="left")
        ties = np.searchsorted(negatives, positives, side="right") - below
        out.append(float((below + 0.5 * ties).mean() / negatives.size))
    return np.array(out)


def sign_flip_p(gains: np.ndarray, generator: np.random.Generator | None = None, draws: int = 20_000) -> float:
    """One-sided p-value of a mean gain > 0: the share of sign flips of the paired gains whose mean is at least the
    observed one; exact (all 2^n flips) up to 16 pairs, else ``draws`` random flips of ``generator``."""
    gains = np.asarray(gains, np.float64)
    n = gains.size
    if n == 0:
        return 1.0
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        generator = generator if generator is not None else np.random.default_rng(0)
        signs = generator.choice(np.array([-1, 1]), size=(draws, n))
    flipped = (signs * gains).mean(axis=1)
    return float((flipped >= gains.mean() - 1e-12).mean())


def choose(runs: dict[str, Predictions], index: np.ndarray | None = None) -> tuple[str, dict[str, dict[str, float]]]:
    """The candidate that the masked rejects (of ``index``) show better than all stages (see the module's
    docstring), else ``all``. Returns (chosen, per candidate: labelled pixel AUROC, mean per-reject gain,
    p-value)."""
    base = per_reject_auroc(runs[ALL], index)
    others = [name for name in runs if name != ALL]
    level = SIGNIFICANCE / max(1, len(others))
    report: dict[str, dict[str, float]] = {ALL: {"pixel_auroc": labelled_pixel_auroc(runs[ALL], index)}}
    passed = {}
    for name in others:
        gains = per_reject_auroc(runs[name], index) - base
        p = sign_flip_p(gains)
        report[name] = {"pixel_auroc": labelled_pixel_auroc(runs[name], index), "mean_gain": float(gains.mean()),
                        "p_value": p}  # fmt: skip
        if gains.mean() > 0 and p <= level:
            passed[name] = float(gains.mean())
    return (max(passed, key=passed.get) if passed else ALL), report


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
    runs: dict[str, Predictions] = {}
    for name, stages in stage_candidates(cfg).items():
        runs[name] = predict(use_stages(model, cfg, stages, stats_images, device))
        if labelled_pixel_auroc(runs[name]) is None:
            raise DmddError("--choose-stages needs masks of the defective images (--mask-dir): the stages are chosen "
                            "by how well the labelled defects' pixels are ranked")  # fmt: skip
    chosen, candidates = choose(runs)
    cfg = use_stages(model, cfg, stage_candidates(cfg)[chosen], stats_images, device)
    report = {"chosen": chosen, "fused_stages": list(cfg.model.fused_stages or cfg.model.map_stages),
              "candidates": candidates, "masked_rejects": int(per_reject_auroc(runs[ALL]).size),
              "significance": SIGNIFICANCE, "holdout_images": len(holdout)}  # fmt: skip
    return cfg, runs[chosen], report


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
