"""Which map the anomaly map is, chosen from a few labelled rejects with masks (``dmdd calibrate --choose-map``,
formerly ``--choose-stages``; a deviation, docs/deviations.md): which stages' maps it adds up and, on textures, how
wide the regional map's stage-3 window is.

The plain sum of the standardised stage maps weighs every stage alike. Which stages carry a set's defects differs:
on tire the deepest stage's maps (8 x 8 at 256 px) spread every defect over a quarter of the tyre and the sum
without them localises better; on magnetic_tile the same stage is the best single one. Synthetic anomalies rank the
stages alike on both sets, so they cannot choose; a few real rejects with masks can.

On textures the regional map (:mod:`dmdd.models.regional`) faces the same kind of choice: a wider window sees
defects that change a large area a little (magnetic_tile's "uneven" tiles), a narrower one keeps small defects sharp.

The candidates are the trained map (all of ``model.map_stages``, the trained windows), each stage left out and, with
a regional map, its stage-3 window widened from k to 2k - 1 cells (5 -> 9: 144 px at 256 px). For every candidate
the maps' statistics are refitted on the held-out good training images (as training fits them; a wider window also
refits the regional Gaussian and bank on the training images) and the labelled images are scored. The candidate that
ranks the labelled pixels best (pixel AUROC) replaces the trained map only where the labelled images support it:
resampled with replacement (good and defective images each among themselves), it must beat the trained map in at
least 95 % of the resamples. A few rejects then choose only what they can show: with 10 rejects on magnetic_tile,
where the candidates differ by less than a point, the best labelled pixel AUROC alone dropped all stages in 20 of 20
draws and cost 0.2 P-AUROC and 0.5 AU-PRO on the rest of the split; a sign-flip test over the rejects' own AUROCs
kept all stages on tire too, where most of the gain comes from a few rejects (docs/decisions.md).
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
from dmdd.evaluation.statistics import fit_map_statistics, fit_teacher_gaussians
from dmdd.models.dmdd import DMDD, fused_indices
from dmdd.models.regional import windows_of

ALL = "all"


def map_candidates(cfg: Config, regional: bool = False,
                   trained_windows: tuple[int, ...] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The maps the labelled rejects choose among, as changes of the model's config: ``{"all": trained map,
    "without stage s": ..., "stage-3 window 9": ...}`` (the window candidate only with a ``regional`` map).
    ``trained_windows``: the regional windows the run trained with (default: the config's)."""
    stages = cfg.model.map_stages
    windows = tuple(trained_windows or cfg.model.regional_windows)
    trained: dict[str, Any] = {"fused_stages": None, "regional_windows": windows}
    out = {ALL: trained}
    if len(stages) > 1:
        out |= {f"without stage {s}": trained | {"fused_stages": tuple(t for t in stages if t != s)} for s in stages}
    if regional:
        wide = 2 * windows[1] - 1
        out[f"stage-3 window {wide}"] = trained | {"regional_windows": (windows[0], wide)}
    return out


def statistics_inputs(records: list[Record], cfg: Config, preload_max: int = 1024) -> list[Record] | torch.Tensor:
    """The held-out good images the maps' statistics are fitted on, as training fits them: decoded once when there
    are at most ``preload_max``; with tiles, a few tiles of each image."""
    if cfg.model.tile:
        return preload_tiles(records, cfg, min(256, max(64, 4 * len(records))))
    return preload_images(records, cfg) if len(records) <= preload_max else records


def regional_refitter(model: DMDD, train: list[Record], cfg: Config,
                      device: torch.device) -> Callable[[tuple[int, ...]], None]:  # fmt: skip
    """A function that gives ``model.regional`` other window sides, its Gaussian and bank fitted on the training
    images ``train`` as training fits them (same draws: ``cfg.train.seed``); each fit is kept, so going back to an
    earlier window costs nothing."""
    def state() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in model.regional.state_dict().items()}

    fits = {tuple(model.regional.windows.values()): state()}
    fitted_on: list[Record] | torch.Tensor | None = None

    def refit(sides: tuple[int, ...]) -> None:
        nonlocal fitted_on
        model.regional.windows = windows_of(sides)
        if sides in fits:
            model.regional.load_state_dict(fits[sides])
            return
        if fitted_on is None:  # with tiles, the Gaussians of tiles, as the model sees them
            fitted_on = preload_tiles(train, cfg) if cfg.model.tile else train
        fit_teacher_gaussians(model, fitted_on, cfg, device, global_score=False)
        fits[sides] = state()

    return refit


def use_candidate(model: DMDD, cfg: Config, change: dict[str, Any], stats_images, device: torch.device,
                  refit_regional: Callable[[tuple[int, ...]], None] | None = None) -> Config:  # fmt: skip
    """Make ``model`` the candidate map ``change`` (a :func:`map_candidates` value): the stages it adds up, the
    regional windows (refitted by ``refit_regional`` where they change), and refit the statistics that depend on the
    map (regional combination, the image score's standardisation). Returns the changed config."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **change))
    model.cfg = cfg.model
    model.fused = fused_indices(cfg.model)
    if model.regional is not None and windows_of(cfg.model.regional_windows) != model.regional.windows:
        if refit_regional is None:
            raise DmddError("a regional window candidate needs the training images to refit the regional map")
        refit_regional(cfg.model.regional_windows)
    fit_map_statistics(model, stats_images, cfg, device)
    model.eval()
    return cfg


def known_pixels(p: Predictions, index: np.ndarray | None = None) -> np.ndarray:
    """(N,) which images (of ``index``, default all) have known pixels: good images, defective ones with a mask."""
    known = p.pixel_labelled()
    return known if index is None else known & np.isin(np.arange(known.size), index)


def labelled_pixel_auroc(p: Predictions, index: np.ndarray | None = None) -> float | None:
    """Pixel AUROC over the images (of ``index``, default all) whose pixels are known: good images, defective ones
    with a mask; ``None`` without a defect mask among them."""
    known = known_pixels(p, index)
    if not (known & (p.labels == 1)).any():
        return None
    return metrics.auroc(p.masks[known].ravel() > 0, p.maps[known].ravel())


CONFIDENCE = 0.95
RESAMPLES = 1000


def pair_counts(p: Predictions, index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pixel AUROC of the images (of ``index``) whose pixels are known, split by image pair, so that any
    resample of the images gives its AUROC without sorting again.

    Returns:
        (U (R, J): for masked reject r and image j, the (defect pixel of r, normal pixel of j) pairs ranked the right
        way, ties counting half; defect pixels per reject (R,); normal pixels per image (J,); the position in J of
        each reject (R,)). The pooled AUROC is ``U.sum() / (pos.sum() * neg.sum())``.
    """
    known = known_pixels(p, index)
    images = np.flatnonzero(known)
    masks = [p.masks[j] > 0 for j in images]
    negatives = [np.sort(p.maps[j][~m]) for j, m in zip(images, masks)]
    rejects = [k for k, m in enumerate(masks) if m.any()]
    counts = np.zeros((len(rejects), images.size))
    for r, k in enumerate(rejects):
        positives = p.maps[images[k]][masks[k]]
        for j, neg in enumerate(negatives):
            below = np.searchsorted(neg, positives, side="left")
            counts[r, j] = below.sum() + 0.5 * (np.searchsorted(neg, positives, side="right") - below).sum()
    pos = np.array([masks[k].sum() for k in rejects], np.float64)
    neg = np.array([n.size for n in negatives], np.float64)
    return counts, pos, neg, np.array(rejects, int)


def resampled_auroc(counts: np.ndarray, pos: np.ndarray, neg: np.ndarray, rejects: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:  # fmt: skip
    """Pooled pixel AUROC of image resamples: ``weights`` (B, J) says how often each image is drawn. Returns (B,)."""
    w_rejects = weights[:, rejects]
    return np.einsum("br,rj,bj->b", w_rejects, counts, weights) / ((w_rejects @ pos) * (weights @ neg))


def choose(runs: dict[str, Predictions], index: np.ndarray | None = None,
           generator: np.random.Generator | None = None) -> tuple[str, dict[str, dict[str, float]]]:  # fmt: skip
    """The candidate whose map ranks the labelled pixels (of ``index``) better than all stages, where the labelled
    images support it; else ``all``.

    The labelled images are resampled with replacement, the good images among themselves and the defective ones
    among themselves (``RESAMPLES`` times, ``generator``, default seeded with 0). A candidate qualifies when its
    pixel AUROC beats all stages' on the labelled images and in at least ``CONFIDENCE`` of the resamples; of those
    that qualify, the largest gain wins.

    Returns:
        (chosen, per candidate: labelled pixel AUROC, gain over all stages, share of resamples with a gain).
    """
    generator = generator if generator is not None else np.random.default_rng(0)
    split = {name: pair_counts(p, index) for name, p in runs.items()}
    known = known_pixels(runs[ALL], index)
    labels = runs[ALL].labels[known]
    weights = np.zeros((RESAMPLES, labels.size))
    for value in (0, 1):  # stratified: each class keeps its count
        members = np.flatnonzero(labels == value)
        draws = generator.integers(0, members.size, (RESAMPLES, members.size)) if members.size else None
        if draws is not None:
            np.add.at(weights, (np.arange(RESAMPLES)[:, None], members[draws]), 1.0)
    ones = np.ones((1, labels.size))
    point = {name: float(resampled_auroc(*c, ones)[0]) for name, c in split.items()}
    resampled = {name: resampled_auroc(*c, weights) for name, c in split.items()}
    report: dict[str, dict[str, float]] = {ALL: {"pixel_auroc": point[ALL]}}
    qualified = {}
    for name in runs:
        if name == ALL:
            continue
        gain = point[name] - point[ALL]
        share = float(np.mean(resampled[name] > resampled[ALL]))
        report[name] = {"pixel_auroc": point[name], "gain": gain, "resamples_with_gain": share}
        if gain > 0 and share >= CONFIDENCE:
            qualified[name] = gain
    return (max(qualified, key=qualified.get) if qualified else ALL), report


def choose_map(model: DMDD, cfg: Config, holdout: list[Record], train: list[Record],
               predict: Callable[[Config], Predictions], device: torch.device,
               trained_windows: tuple[int, ...] | None = None) -> tuple[Config, Predictions, dict[str, Any]]:  # fmt: skip
    """Score the labelled images (``predict``) with every candidate map and keep the best; the model is left with
    the chosen map and its refitted statistics. ``holdout``: the run's held-out good training images; ``train``: its
    training images (a window candidate refits the regional map on them).

    Returns:
        (the chosen config, its predictions of the labelled images, a report: candidates' pixel AUROC, chosen).
    """
    if model.segmentation is not None:
        raise DmddError("--choose-map needs the plain-sum model (model.msn: false): the MSN weighs its maps itself")
    stats_images = statistics_inputs(holdout, cfg)
    candidates = map_candidates(cfg, model.regional is not None, trained_windows)
    refit = regional_refitter(model, train, cfg, device) if model.regional is not None else None
    runs: dict[str, Predictions] = {}
    for name, change in candidates.items():
        runs[name] = predict(use_candidate(model, cfg, change, stats_images, device, refit))
        if labelled_pixel_auroc(runs[name]) is None:
            raise DmddError("--choose-map needs masks of the defective images (--mask-dir): the map is chosen by how "
                            "well the labelled defects' pixels are ranked")  # fmt: skip
    chosen, scored = choose(runs)
    cfg = use_candidate(model, cfg, candidates[chosen], stats_images, device, refit)
    report = {"chosen": chosen, "fused_stages": list(cfg.model.fused_stages or cfg.model.map_stages),
              "regional_windows": list(cfg.model.regional_windows) if model.regional is not None else None,
              "candidates": scored, "masked_rejects": int(pair_counts(runs[ALL])[1].size),
              "confidence": CONFIDENCE, "holdout_images": len(holdout)}  # fmt: skip
    return cfg, runs[chosen], report


def training_split(cfg: Config, data_root: str | Path | None = None) -> tuple[list[Record], list[Record]]:
    """(training images, held-out good training images) of the run that wrote ``cfg`` (all training images on both
    sides when none were held out), found again from its data root (or ``data_root``) and seed."""
    from dmdd.data.datasets import load_category
    from dmdd.training.loop import split_holdout

    root = Path(data_root or cfg.data.root)
    try:
        category = load_category(root, cfg.data.category, cfg.data.layout)
    except (DmddError, FileNotFoundError) as exc:
        raise DmddError(f"--choose-map refits the maps' statistics on the model's held-out good training images, "
                        f"but its training data could not be read at {root} ({exc}); pass --data-root DIR, the "
                        f"folder holding {cfg.data.category}/train/good") from None  # fmt: skip
    train, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    return train, holdout or train


def training_holdout(cfg: Config, data_root: str | Path | None = None) -> list[Record]:
    """The held-out good training images of the run that wrote ``cfg`` (all training images when none were held
    out), found again from its data root (or ``data_root``) and seed."""
    return training_split(cfg, data_root)[1]
