"""Thresholds from labelled images (``dmdd calibrate``): a few known good parts and known rejects set the image
threshold by a rule the line operator chooses, with an honest estimate of the recall and false-alarm rate a user
will see on new parts.

Rules (``score >= threshold`` is a reject):

- ``f1``: the threshold of the best F1 over the labelled images (anomalib's "F1-adaptive" threshold);
- ``fpr=X``: from the good images alone, the threshold just above the k-th highest good score with
  k = floor(X (n + 1)). For n exchangeable good images a new good image lies above the k-th highest of them with
  probability k / (n + 1) <= X, so X is the expected false-alarm rate on new parts, not on the labelled ones
  (a conformal quantile). It needs n >= 1/X - 1 good images;
- ``recall-at-fpr=X``: the same false-alarm limit, with the threshold placed half-way between that good score and
  the next reject above it: the labelled recall is the same, with room on both sides for parts not seen yet.

Known good parts are few, and 10 of them cannot set a false-alarm rate under 1/11. The run's held-out good training
images are known good parts too: for the ``fpr`` rules they join the labelled good images when a one-sided
Mann-Whitney test (level ``POOL_ALPHA``) does not find the labelled good images scoring higher than them. A line
whose good parts have drifted since training (another capture, another lighting) shows up as labelled good images
scoring higher, and then only the labelled ones count. ``f1`` weighs good against defective images and stays on
the labelled ones.

The estimate is cross-validated: each labelled image is decided by the threshold the rule sets on the other
images (leave-one-out up to 60 images, else 10 folds stratified by label), and recall and false-alarm rate come with
95 % Wilson intervals, which say how little ten images prove. With masks, the pixel threshold is the pixel F1-max
threshold over the labelled images whose pixels are known.

The thresholds of training (good images only) are kept beside the labelled ones under ``"unlabelled"``;
``dmdd calibrate CKPT --reset`` goes back to them.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dmdd.errors import DmddError

RULES = ("f1", "fpr", "recall-at-fpr")
LEAVE_ONE_OUT_MAX = 60
POOL_ALPHA = 0.05  # the held-out good images join unless the labelled good ones score higher at this level


def stored_held_out_scores(thresholds: dict[str, Any] | None) -> np.ndarray | None:
    """The held-out good training images' scores training stored with its thresholds (``None`` in checkpoints
    written before they were stored, or when no image was held out)."""
    scores = ((thresholds or {}).get("normal") or {}).get("scores")
    return None if scores is None else np.asarray(scores, np.float64)


def pool_held_out(labelled_good: np.ndarray, held_out: np.ndarray | None, rule: str) -> dict[str, Any] | None:
    """Whether the held-out good training images join the labelled good ones for the rule's threshold: ``None``
    when there are none or the rule is ``f1``; else ``{"count", "p_value", "pooled"}`` (one-sided Mann-Whitney U
    test of "labelled good scores are higher"; pooled unless ``p_value < POOL_ALPHA``)."""
    from scipy.stats import mannwhitneyu

    if rule == "f1" or held_out is None or len(held_out) == 0 or len(labelled_good) == 0:
        return None
    p = float(mannwhitneyu(labelled_good, held_out, alternative="greater").pvalue)
    return {"count": int(len(held_out)), "p_value": p, "pooled": p >= POOL_ALPHA}


def parse_rule(text: str) -> tuple[str, float | None]:
    """``f1`` -> ("f1", None); ``fpr=0.01`` / ``recall-at-fpr=0.05`` -> (name, rate)."""
    name, _, value = text.partition("=")
    if name not in RULES:
        raise DmddError(f"unknown --rule {text!r}; use f1, fpr=RATE or recall-at-fpr=RATE (e.g. fpr=0.05)")
    if name == "f1":
        if value:
            raise DmddError(f"--rule f1 takes no value, got {text!r}")
        return name, None
    try:
        rate = float(value)
    except ValueError:
        raise DmddError(f"--rule {name} needs a rate between 0 and 1, e.g. {name}=0.05; got {text!r}") from None
    if not 0 < rate < 1:
        raise DmddError(f"--rule {name}: the rate must be in (0, 1), got {rate:g}")
    return name, rate


def allowed_above(good_count: int, rate: float) -> int:
    """How many of ``good_count`` good scores may lie at or above the threshold for an expected false-alarm rate of
    at most ``rate`` on new good images: k = floor(rate (n + 1)) - 1 (the threshold sits above the (k+1)-th
    highest)."""
    return int(math.floor(rate * (good_count + 1) + 1e-9)) - 1


def rule_threshold(good: np.ndarray, bad: np.ndarray, rule: str, rate: float | None) -> float:
    """The image threshold the rule sets on labelled good and defective scores (``score >= t`` is a reject)."""
    good, bad = np.sort(np.asarray(good, np.float64)), np.sort(np.asarray(bad, np.float64))
    if rule == "f1":
        scores = np.r_[good, bad]
        labels = np.r_[np.zeros(good.size), np.ones(bad.size)]
        order = np.argsort(-scores, kind="stable")
        s, y = scores[order], labels[order]
        last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # tied scores are decided together
        tp = np.cumsum(y)[last]
        fp = (last + 1) - tp
        f1 = 2 * tp / (bad.size + tp + fp)
        return float(s[last[int(np.argmax(f1))]])
    allowed = allowed_above(good.size, rate)
    if allowed < 0:
        raise DmddError(_too_few_good(good.size, rule, rate))
    top = good[good.size - 1 - allowed]  # the highest good score that must stay below the threshold
    above = np.nextafter(top, np.inf)
    if rule == "fpr":
        return float(above)
    next_bad = bad[bad > top]
    return float((top + next_bad[0]) / 2) if next_bad.size else float(above)


def _too_few_good(good: int, rule: str, rate: float) -> str:
    need = math.ceil(1 / rate - 1 - 1e-9)
    return (f"--rule {rule}={rate:g} cannot be met with {good} good image(s): {good} good images can only promise "
            f"a false-alarm rate of 1/{good + 1} = {1 / (good + 1):.3g} or more; give at least {need} good images, "
            f"or use {rule}={1 / (good + 1):.3g} or --rule f1")  # fmt: skip


def check_rule(good: int, bad: int, rule: str, rate: float | None, held_out_good: int = 0) -> None:
    """Refuse what the labelled images (and ``held_out_good`` pooled held-out good images) cannot support, with the
    reason and what to do."""
    if good == 0 or bad == 0:
        missing = "good" if good == 0 else "defective"
        raise DmddError(f"calibration needs labelled good AND defective images; no {missing} image was given "
                        f"(pass --normal-dir and --abnormal-dir)")  # fmt: skip
    if good + bad < 3:
        raise DmddError(f"calibration needs at least 3 labelled images (got {good + bad}): with one image per class "
                        "nothing can be held out to estimate what the threshold will do")  # fmt: skip
    if rule != "f1" and allowed_above(good + held_out_good, rate) < 0:
        raise DmddError(_too_few_good(good + held_out_good, rule, rate))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def folds(labels: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Held-out index sets: one per image up to LEAVE_ONE_OUT_MAX images, else 10 folds stratified by label."""
    n = labels.size
    if n <= LEAVE_ONE_OUT_MAX:
        return [np.array([i]) for i in range(n)]
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, int)
    for value in (0, 1):
        index = np.flatnonzero(labels == value)
        assignment[rng.permutation(index)] = np.arange(index.size) % 10
    return [np.flatnonzero(assignment == k) for k in range(10)]


def cross_validated(scores: np.ndarray, labels: np.ndarray, rule: str, rate: float | None,
                    extra_good: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Each image decided by the threshold the rule sets without it; recall and false-alarm rate with intervals.
    ``extra_good`` (pooled held-out good scores) join the good images of every fold.

    A fold whose remaining good images are too few for the rule's rate decides by the highest of them (the
    strictest threshold the good images allow), so the estimate exists wherever the calibration itself does.
    """
    flagged = np.zeros(labels.size, bool)
    extra = np.empty(0) if extra_good is None else np.asarray(extra_good, np.float64)
    for held in folds(labels):
        rest = np.setdiff1d(np.arange(labels.size), held)
        good, bad = np.r_[scores[rest][labels[rest] == 0], extra], scores[rest][labels[rest] == 1]
        if good.size == 0 or bad.size == 0:  # the fold took a whole class: decide by the other class alone
            t = np.nextafter(good.max(), np.inf) if good.size else bad.min()
        elif rule != "f1" and allowed_above(good.size, rate) < 0:
            t = np.nextafter(good.max(), np.inf)
        else:
            t = rule_threshold(good, bad, rule, rate)
        flagged[held] = scores[held] >= t
    caught, alarms = int(flagged[labels == 1].sum()), int(flagged[labels == 0].sum())
    n_bad, n_good = int((labels == 1).sum()), int((labels == 0).sum())
    return {"method": "leave-one-out" if labels.size <= LEAVE_ONE_OUT_MAX else "10-fold",
            "recall": caught / n_bad, "recall_95ci": wilson(caught, n_bad),
            "false_alarm_rate": alarms / n_good, "false_alarm_95ci": wilson(alarms, n_good)}  # fmt: skip


def labelled_thresholds(scores: np.ndarray, labels: np.ndarray, rule_text: str,
                        maps: np.ndarray | None = None, masks: np.ndarray | None = None,
                        known_pixels: np.ndarray | None = None,
                        held_out: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """The thresholds a rule sets on labelled images, and what they do there and (cross-validated) on new images.

    Args:
        scores: (N,) image scores; labels: (N,) 0 good, 1 defective.
        rule_text: ``f1``, ``fpr=X`` or ``recall-at-fpr=X``.
        maps, masks: (N, H, W) anomaly maps and ground truth, for the pixel threshold (optional).
        known_pixels: (N,) which images' pixels are known (good images always; defective ones with a mask).
        held_out: scores of the run's held-out good training images: pooled with the labelled good images for the
            ``fpr`` rules where :func:`pool_held_out` allows (optional).
    """
    from dmdd.evaluation import metrics

    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    rule, rate = parse_rule(rule_text)
    pool = pool_held_out(scores[labels == 0], held_out, rule)
    extra = np.asarray(held_out, np.float64) if pool and pool["pooled"] else None
    n_extra = 0 if extra is None else extra.size
    check_rule(int((labels == 0).sum()), int((labels == 1).sum()), rule, rate, n_extra)
    good = scores[labels == 0] if extra is None else np.r_[scores[labels == 0], extra]
    image = rule_threshold(good, scores[labels == 1], rule, rate)
    flagged = scores >= image
    out: dict[str, Any] = {
        "rule": rule_text, "image": image, "pixel": None, "pixel_source": None, "held_out_good": pool,
        "on_labelled": {"recall": float(flagged[labels == 1].mean()),
                        "false_alarm_rate": float(flagged[labels == 0].mean())},
        "estimate": cross_validated(scores, labels, rule, rate, extra),
        "image_auroc": metrics.auroc(labels, scores),
    }  # fmt: skip
    if maps is not None and masks is not None:
        known = np.ones(labels.size, bool) if known_pixels is None else np.asarray(known_pixels, bool)
        masked = known & (labels == 1)
        if masked.any():
            out["pixel"] = metrics.f1_max(masks[known], maps[known])[1]
            out["pixel_source"] = (f"pixel F1-max over {int(known.sum())} images with known pixels "
                                   f"({int(masked.sum())} defect masks)")  # fmt: skip
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def provenance(files: dict[str, str], labels: list[int], masks: int, source: str) -> dict[str, Any]:
    """Who set the thresholds from what: file names with content hashes, counts, date and dmdd version."""
    from dmdd import __version__

    return {"good_images": labels.count(0), "defective_images": labels.count(1), "masks": masks, "files": files,
            "source": source, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dmdd": __version__}  # fmt: skip


def with_labelled(thresholds: dict[str, Any] | None, labelled: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's thresholds with the labelled ones deciding; training's stay under ``"unlabelled"``."""
    out = dict(thresholds or {})
    if out.get("mode") != "labelled":
        out["unlabelled"] = {k: out.get(k) for k in ("image", "pixel", "mode")}
    pixel = labelled["pixel"] if labelled.get("pixel") is not None else out["unlabelled"].get("pixel")
    out.update({"image": labelled["image"], "pixel": pixel, "mode": "labelled", "labelled": labelled})
    return out


def without_labelled(thresholds: dict[str, Any] | None, path: str | Path) -> dict[str, Any]:
    """Back to the thresholds training set (``--reset``)."""
    out = dict(thresholds or {})
    if out.get("mode") != "labelled":
        raise DmddError(f"{path} holds no labelled thresholds; nothing to reset")
    out.update(out.pop("unlabelled"))
    out.pop("labelled", None)
    return out


def describe(thresholds: dict[str, Any] | None) -> str:
    """One line saying which threshold decides and where it came from, for every output that shows a decision."""
    if not thresholds or thresholds.get("image") is None:
        return "no calibrated threshold"
    mode = thresholds.get("mode", "synthetic")
    if mode == "labelled":
        lab = thresholds["labelled"]
        stages = lab.get("stages") or {}
        maps = f"; {_map_words(stages)} (chosen on their masks)" if stages.get("chosen", "all") != "all" else ""
        pool = lab.get("held_out_good") or {}
        pooled = f" and {pool['count']} held-out good training images" if pool.get("pooled") else ""
        return (f"labelled: rule {lab['rule']} on {lab['good_images']} good + {lab['defective_images']} defective "
                f"images{pooled} ({lab['date'][:10]}){maps}")  # fmt: skip
    if mode == "normal":
        normal = thresholds.get("normal") or {}
        method = {"tail": ", fitted tail: too few for a quantile"}.get(normal.get("method"), "")
        return (f"normal: {100 * normal.get('target_fpr', 0.01):g} % false-alarm target on "
                f"{thresholds.get('normal_images', '?')} held-out good training images{method}")  # fmt: skip
    return "synthetic: held-out good training images against synthetic anomalies"


def _decodable(records: list, size: int, resize: str) -> tuple[list, list[str]]:
    """The records whose image decodes; a warning line naming each one that does not."""
    from dmdd.data.io import read_image
    from dmdd.errors import ImageReadError

    usable, warnings = [], []
    for r in records:
        try:
            read_image(r.image, size, resize)
            usable.append(r)
        except ImageReadError as exc:
            warnings.append(f"warning: skipped {r.image}: {exc.reason}")
    return usable, warnings


def calibrate_checkpoint(checkpoint: str | Path, normal_dir: str | Path | None, abnormal_dirs: dict[str, Path],
                         mask_dir: str | Path | None = None, rule_text: str = "f1", device_name: str = "auto",
                         dry_run: bool = False, choose_map: bool = False,
                         data_root: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Score labelled images with a checkpoint, set the thresholds by the rule, estimate what a user will see and,
    unless ``dry_run``, store them in the checkpoint with their provenance (written atomically).

    With ``choose_map`` the labelled masks first choose the anomaly map: which stages' maps it adds up and, on
    textures, the regional map's window (:mod:`dmdd.evaluation.stages`); the maps' statistics and training's
    good-image thresholds are refitted for the chosen map on the run's held-out good training images (read from
    ``data_root``, default the checkpoint's), and what they replace is kept in the checkpoint so that ``--reset``
    restores it.

    Returns:
        ``{"thresholds", "warnings", "written", "describe"}``.
    """
    from dmdd.checkpoint import config_of, load_checkpoint, restore_model, save_checkpoint
    from dmdd.data.datasets import folder_test_records
    from dmdd.device import select_device
    from dmdd.evaluation import stages
    from dmdd.evaluation.predictions import predict_split
    from dmdd.evaluation.thresholds import calibrate

    parse_rule(rule_text)  # a bad rule fails before any image is read
    if normal_dir is None:
        raise DmddError("no good images given: pass --normal-dir DIR (known good parts)")
    if not abnormal_dirs:
        raise DmddError("no defective images given: pass --abnormal-dir DIR (known rejects; repeat per defect type)")
    if mask_dir is not None and not Path(mask_dir).is_dir():
        raise DmddError(f"mask folder not found: {mask_dir}")
    device = select_device(device_name)
    model, payload = restore_model(checkpoint, device)
    cfg = config_of(payload, checkpoint)
    records = folder_test_records({**abnormal_dirs, "good": Path(normal_dir)}, Path(mask_dir) if mask_dir else None)
    records, warnings = _decodable(records, cfg.model.image_size, cfg.model.resize)
    labels = [int(r.label) for r in records]
    rule, _ = parse_rule(rule_text)
    check_rule(labels.count(0), labels.count(1), "f1", None)  # the rate is checked once held-out images may join
    masks = sum(r.mask is not None for r in records)
    base, stage_report = payload.get("thresholds"), None
    if choose_map:
        if masks == 0:
            raise DmddError("--choose-map needs masks of the defective images (--mask-dir DIR, one per reject by "
                            "file stem): the map is chosen by how well the defects' pixels are ranked")  # fmt: skip
        train, holdout = stages.training_split(cfg, data_root)
        cfg, p, stage_report = stages.choose_map(model, cfg, holdout, train,
                                                 lambda c: predict_split(model, records, c, device), device,
                                                 trained_windows(payload))  # fmt: skip
        base = calibrate(model, holdout, cfg, device)  # training's good-image thresholds, for the chosen map
    else:
        p = predict_split(model, records, cfg, device)
    held = None
    if rule != "f1":
        held = stored_held_out_scores(base)
        if held is None and cfg.train.holdout_fraction > 0:  # written before the scores were stored: score them
            try:
                held = predict_split(model, stages.training_holdout(cfg, data_root), cfg, device).scores
            except DmddError:
                warnings.append(f"note: the run's held-out good training images were not found under "
                                f"{data_root or cfg.data.root} (--data-root DIR); only the labelled good images set "
                                f"the threshold")  # fmt: skip
    labelled = labelled_thresholds(p.scores, p.labels, rule_text, p.maps, p.masks, p.pixel_labelled(), held)
    if stage_report is not None:
        labelled["stages"] = stage_report
    files = {str(r.image): digest(Path(r.image).read_bytes()) for r in records}
    labelled |= provenance(files, labels, masks, f"dmdd calibrate --normal-dir {normal_dir}")
    thresholds = with_labelled(base, labelled)
    if not dry_run:
        stored = load_checkpoint(checkpoint)  # the file as written (restore_model may have migrated a copy)
        if stage_report is not None:
            _store_stage_choice(stored, model, cfg)
        stored["thresholds"] = thresholds
        save_checkpoint(checkpoint, stored)
    return {"thresholds": thresholds, "warnings": warnings, "written": not dry_run, "describe": describe(thresholds)}


BEFORE_STAGES = "before_stage_choice"


def trained_windows(payload: dict[str, Any]) -> tuple[int, ...] | None:
    """The regional windows the run trained with, where an earlier ``--choose-map`` changed them (``None``: the
    checkpoint's are the trained ones)."""
    from dmdd.config import ModelConfig

    before = payload.get(BEFORE_STAGES)
    if before is None:
        return None
    return tuple(before.get("regional_windows") or ModelConfig.regional_windows)  # absent: written before the option


def _store_stage_choice(stored: dict[str, Any], model, cfg) -> None:
    """Write the chosen map (stages, regional windows) and the refitted statistics into the checkpoint's payload,
    keeping the trained values of what they replace for ``--reset``."""
    changed = {name: buf.detach().cpu().clone() for name, buf in model.named_buffers()
               if name in stored["model"] and not _same_tensor(stored["model"][name], buf)}  # fmt: skip
    model_cfg = stored["config"]["model"]
    if BEFORE_STAGES not in stored:
        stored[BEFORE_STAGES] = {"fused_stages": model_cfg.get("fused_stages"),
                                 "regional_windows": model_cfg.get("regional_windows"),
                                 "buffers": {name: stored["model"][name] for name in changed},
                                 "thresholds": stored.get("thresholds")}  # fmt: skip
    else:  # buffers an earlier choice changed keep their trained values; those it did not change are added
        before = stored[BEFORE_STAGES]["buffers"]
        before |= {name: stored["model"][name] for name in changed if name not in before}
    model_cfg["fused_stages"] = None if cfg.model.fused_stages is None else list(cfg.model.fused_stages)
    model_cfg["regional_windows"] = list(cfg.model.regional_windows)
    stored["model"].update(changed)


def _same_tensor(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b.detach().to(a.device, a.dtype)))


def reset_checkpoint(checkpoint: str | Path) -> dict[str, Any]:
    """Remove the labelled thresholds: training's decide again (and, after ``--choose-map``, training's map)."""
    from dmdd.checkpoint import load_checkpoint, save_checkpoint

    stored = load_checkpoint(checkpoint)
    before = stored.pop(BEFORE_STAGES, None)
    if before is not None:
        stored["config"]["model"]["fused_stages"] = before["fused_stages"]
        windows = before.get("regional_windows")
        if windows is None:  # written before the option: the default
            stored["config"]["model"].pop("regional_windows", None)
        else:
            stored["config"]["model"]["regional_windows"] = windows
        stored["model"].update(before["buffers"])
        stored["thresholds"] = before["thresholds"]
        if (stored["thresholds"] or {}).get("mode") == "labelled":
            stored["thresholds"] = without_labelled(stored["thresholds"], checkpoint)
    else:
        stored["thresholds"] = without_labelled(stored.get("thresholds"), checkpoint)
    save_checkpoint(checkpoint, stored)
    return {"thresholds": stored["thresholds"], "describe": describe(stored["thresholds"])}


def summary(report: dict[str, Any]) -> str:
    """What ``dmdd calibrate`` prints: the thresholds, how they do on the labelled images, and the honest estimate."""
    lab = report["thresholds"]["labelled"]
    est, on = lab["estimate"], lab["on_labelled"]
    old = report["thresholds"].get("unlabelled") or {}

    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    def ci(pair) -> str:
        return f"[{pct(pair[0])}, {pct(pair[1])}]"

    lines = [
        *report["warnings"],
        f"rule {lab['rule']} on {lab['good_images']} good + {lab['defective_images']} defective images "
        f"(image AUROC {100 * lab['image_auroc']:.1f})",
        f"image threshold {lab['image']:.6g} (training's, from good images only: {old.get('image')})",
        f"pixel threshold {report['thresholds']['pixel']:.6g}"
        + (f" ({lab['pixel_source']})" if lab["pixel_source"] else " (training's: no masks given)"),
        *_stage_lines(lab.get("stages")),
        *_held_out_lines(lab.get("held_out_good")),
        f"on the labelled images: recall {pct(on['recall'])}, false alarms {pct(on['false_alarm_rate'])}",
        f"expected on new parts ({est['method']}, 95 % interval): recall {pct(est['recall'])} "
        f"{ci(est['recall_95ci'])}, false alarms {pct(est['false_alarm_rate'])} {ci(est['false_alarm_95ci'])}",
    ]
    if lab["good_images"] + lab["defective_images"] < 40:
        lines.append(f"note: {lab['good_images'] + lab['defective_images']} images prove little; the intervals above "
                     "are what they can promise. Label more parts to narrow them.")  # fmt: skip
    lines.append("written to the checkpoint" if report["written"] else "dry run: the checkpoint is unchanged")
    return "\n".join(lines)


def _held_out_lines(pool: dict[str, Any] | None) -> list[str]:
    if not pool:
        return []
    if pool["pooled"]:
        return [f"good images: the labelled ones and {pool['count']} held-out good training images (their scores do "
                f"not differ: Mann-Whitney p = {pool['p_value']:.2g})"]  # fmt: skip
    return [f"good images: the labelled ones only; they score higher than the {pool['count']} held-out good training "
            f"images (Mann-Whitney p = {pool['p_value']:.2g}): the parts may have changed since training"]  # fmt: skip


def _map_words(report: dict[str, Any]) -> str:
    """'map of stages 1, 2, 3' and, with a regional map, ', regional windows 7 and 9'."""
    words = f"map of stages {', '.join(map(str, report['fused_stages']))}"
    windows = report.get("regional_windows")
    return words + (f", regional windows {windows[0]} and {windows[1]}" if windows else "")


def _stage_lines(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    lines = [f"map: {report['chosen']} ({_map_words(report)}), by "
             f"{report['masked_rejects']} masked rejects; statistics and training's thresholds refitted on "
             f"{report['holdout_images']} held-out good training images"]  # fmt: skip
    for name, c in report["candidates"].items():
        test = (f", gain {100 * c['gain']:+.2f}, in {100 * c['resamples_with_gain']:.0f} % of resamples"
                if "gain" in c else "")  # fmt: skip
        lines.append(f"  {name}: labelled pixel AUROC {100 * c['pixel_auroc']:.2f}{test}")
    return lines
