"""What a threshold does on parts it has not seen: labelled calibration (``dmdd calibrate``) from a few test images,
and the good-images-only calibration from held-out sets of a few images.

1. Labelled: ``--draws`` times, ``--labelled`` good and ``--labelled`` defective test images are drawn (seeded); each
   rule of ``--rules`` sets the threshold on them as ``dmdd calibrate`` does (the false-alarm rules pool the
   checkpoint's held-out good training images where the labelled good ones do not score higher; a second row per
   such rule uses the labelled good images alone); the rest of the test split measures recall and false alarms,
   beside the best recall any threshold allows at the same false-alarm rate on the same rest, and beside the
   cross-validated estimate ``dmdd calibrate`` prints from the drawn images.
2. Good images only: held-out good training images (the checkpoint's own split) are subsampled to each of
   ``--holdout-sizes``; the 1 % threshold is set by the quantile where the sample allows one and otherwise by the
   maximum (before) or, now, a normal tail fitted to the scores (dmdd.evaluation.thresholds); false alarms and
   recall on the whole test split.

3. With ``--choose-map``, the labelled images also choose the map (``dmdd calibrate --choose-map``,
   dmdd.evaluation.stages): every candidate (the trained map, each stage left out and, on textures, the wider
   regional window) is refitted on the training images and scores the test split once; in each draw of part 1 the
   drawn images (with their masks) choose a candidate, and the rest of the split measures the chosen map against the
   trained map (pixel AUROC, AU-PRO, image AUROC, and each rule's recall and false alarms).

    python benchmarks/thresholds.py runs/benchmark/dev/tire/tire/dmdd-lite0-250steps-seed0/run/last.pt \
        --category tire --choose-map --out docs/results/thresholds_tire.json
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from common import checkpoint_parser, open_checkpoint

from dmdd.data import load_category
from dmdd.device import select_device
from dmdd.evaluation import metrics
from dmdd.evaluation.labelled import labelled_thresholds, parse_rule
from dmdd.evaluation.predictions import predict_split
from dmdd.evaluation.stages import (
    ALL,
    choose,
    labelled_pixel_auroc,
    map_candidates,
    regional_refitter,
    statistics_inputs,
    use_candidate,
)
from dmdd.evaluation.thresholds import best_detection_at, normal_threshold_method
from dmdd.training.loop import split_holdout


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values))}


def draw_labelled(labels: np.ndarray, per_class: int, seed: int, draw: int) -> tuple[np.ndarray, np.ndarray]:
    """(drawn indices: ``per_class`` good then ``per_class`` defective, the rest), seeded by (seed, draw)."""
    good_idx, bad_idx = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    rng = np.random.default_rng([seed, draw])
    pick = np.r_[rng.choice(good_idx, per_class, replace=False), rng.choice(bad_idx, per_class, replace=False)]
    return pick, np.setdiff1d(np.arange(labels.size), pick)


def labelled_study(scores: np.ndarray, labels: np.ndarray, rules: list[str], per_class: int, draws: int,
                   seed: int, held: np.ndarray | None = None) -> list[dict]:  # fmt: skip
    """Part 1; ``held``: the held-out good training images' scores (``dmdd calibrate`` pools them)."""
    rows = []
    for rule_text in rules:
        rule, _ = parse_rule(rule_text)
        for goods in ("labelled", "labelled only") if rule != "f1" and held is not None else ("labelled",):
            seen: dict[str, list[float]] = {k: [] for k in ("recall", "fa", "best", "est_recall", "est_fa")}
            pooled = 0
            for draw in range(draws):
                pick, rest = draw_labelled(labels, per_class, seed, draw)
                out = labelled_thresholds(scores[pick], labels[pick], rule_text,
                                          held_out=held if goods == "labelled" else None)  # fmt: skip
                pooled += bool((out["held_out_good"] or {}).get("pooled"))
                t = out["image"]
                good_rest, bad_rest = scores[rest][labels[rest] == 0], scores[rest][labels[rest] == 1]
                fa = float((good_rest >= t).mean())
                seen["recall"].append(float((bad_rest >= t).mean()))
                seen["fa"].append(fa)
                seen["best"].append(best_detection_at(good_rest, bad_rest, fa))
                seen["est_recall"].append(out["estimate"]["recall"])
                seen["est_fa"].append(out["estimate"]["false_alarm_rate"])
            rows.append({"rule": rule_text, "labelled": f"{per_class}+{per_class}", "draws": draws,
                         "goods": goods, "pooled": pooled, **{k: mean_sd(v) for k, v in seen.items()}})  # fmt: skip
    return rows


def normal_only_study(holdout: np.ndarray, scores: np.ndarray, labels: np.ndarray, sizes: list[int], rate: float,
                      draws: int, seed: int) -> list[dict]:  # fmt: skip
    good, bad = scores[labels == 0], scores[labels == 1]
    rows = []
    for n in sorted({min(s, holdout.size) for s in sizes} | {holdout.size}):
        methods: dict[str, dict[str, list[float]]] = {}
        for draw in range(draws if n < holdout.size else 1):
            sample = np.random.default_rng([seed, n, draw]).choice(holdout, n, replace=False)
            chosen, method = normal_threshold_method(sample, rate)
            # dmdd's rule (quantile where n allows, else the fitted tail) against what it replaced (the maximum)
            candidates = {f"dmdd: {method}": chosen, "before: maximum": float(np.nextafter(sample.max(), np.inf))}
            for name, t in candidates.items():
                m = methods.setdefault(name, {"fa": [], "recall": []})
                m["fa"].append(float((good >= t).mean()))
                m["recall"].append(float((bad >= t).mean()))
        for name, m in methods.items():
            rows.append({"held_out": n, "method": name, "draws": len(m["fa"]), "target_fpr": rate,
                         "fa": mean_sd(m["fa"]), "recall": mean_sd(m["recall"])})  # fmt: skip
    return rows


def stage_study(model, cfg, holdout, train, test_records, device, rules: list[str], per_class: int, draws: int,
                seed: int, pooled_holdout: bool = True) -> dict:  # fmt: skip
    """Part 3: the labelled images of each draw choose the map; the rest measures it against the trained map. The
    rules pool the held-out good images scored with the chosen map (``pooled_holdout``: they were not trained on)."""
    stats_images = statistics_inputs(holdout, cfg)
    candidates = map_candidates(cfg, model.regional is not None)
    refit = regional_refitter(model, train, cfg, device) if model.regional is not None else None
    runs, held = {}, {}
    for name, change in candidates.items():
        candidate = use_candidate(model, cfg, change, stats_images, device, refit)
        runs[name] = predict_split(model, test_records, candidate, device)
        held[name] = predict_split(model, holdout, candidate, device).scores if pooled_holdout else None
        print(f"candidate {name}: pixel AUROC {labelled_pixel_auroc(runs[name]):.4f}", flush=True)
    use_candidate(model, cfg, candidates[ALL], stats_images, device, refit)
    labels = runs[ALL].labels
    known = runs[ALL].pixel_labelled()

    def measured(p, rest: np.ndarray) -> dict[str, float]:
        pixels = rest[known[rest]]
        scores, y = p.scores[rest], labels[rest]
        out = {"pixel_auroc": labelled_pixel_auroc(p, rest), "au_pro": metrics.au_pro(p.masks[pixels] > 0, p.maps[pixels]),
               "image_auroc": metrics.auroc(y, scores),
               "best_recall_at_10": best_detection_at(scores[y == 0], scores[y == 1], 0.1)}  # fmt: skip
        return out

    chosen_names, per_variant = [], {"chosen": [], "all": []}
    per_rule: dict[str, dict[str, list[float]]] = {r: {"recall": [], "fa": []} for r in rules}
    for draw in range(draws):
        pick, rest = draw_labelled(labels, per_class, seed, draw)
        name, _ = choose(runs, pick)
        chosen_names.append(name)
        per_variant["all"].append(measured(runs[ALL], rest))
        per_variant["chosen"].append(per_variant["all"][-1] if name == ALL else measured(runs[name], rest))
        p = runs[name]
        s, y = p.scores[pick], labels[pick]
        for rule_text in rules:
            t = labelled_thresholds(s, y, rule_text, held_out=held[name])["image"]
            per_rule[rule_text]["recall"].append(float((p.scores[rest][labels[rest] == 1] >= t).mean()))
            per_rule[rule_text]["fa"].append(float((p.scores[rest][labels[rest] == 0] >= t).mean()))
        print(f"draw {draw}: {name}; rest pixel AUROC {per_variant['chosen'][-1]['pixel_auroc']:.4f} "
              f"(trained map {per_variant['all'][-1]['pixel_auroc']:.4f})", flush=True)
    whole = {name: {"pixel_auroc": labelled_pixel_auroc(p), "image_auroc": metrics.auroc(labels, p.scores)}
             for name, p in runs.items()}  # fmt: skip
    return {
        "labelled": f"{per_class}+{per_class}", "draws": draws,
        "chosen": {name: chosen_names.count(name) for name in runs},
        "rest": {variant: {k: mean_sd([row[k] for row in rows]) for k in rows[0]} for variant, rows in per_variant.items()},
        "rules": [{"rule": r, "recall": mean_sd(v["recall"]), "fa": mean_sd(v["fa"])} for r, v in per_rule.items()],
        "whole_split": whole,  # reported only: never used to choose
    }  # fmt: skip


def main() -> int:
    p = checkpoint_parser(__doc__, threads=2)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--labelled", type=int, default=10, help="labelled images per class in each draw")
    p.add_argument("--rules", default="f1,fpr=0.1,recall-at-fpr=0.1")
    p.add_argument("--holdout-sizes", default="5,10,20")
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--choose-map", "--choose-stages", dest="choose_map", action="store_true",
                   help="part 3: the labelled images also choose the map")
    p.add_argument("--label", help="the name a stacked table gives these results (default: the category)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    model, _, cfg = open_checkpoint(args)
    device = select_device("cpu")
    category = load_category(args.data, args.category)
    train, holdout = split_holdout(category.train, cfg.train.holdout_fraction, cfg.train.seed)
    test = predict_split(model, category.test, cfg, device)
    held = predict_split(model, holdout, cfg, device).scores
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "checkpoint": str(args.checkpoint), "category": args.category, "label": args.label or args.category,
        "commit": commit,
        "test_good": int((test.labels == 0).sum()), "test_defective": int((test.labels == 1).sum()),
        "held_out_good": int(held.size),
        # what the ranking allows on the whole test split: the best recall at each false-alarm rate
        "best_recall_at_false_alarms": {str(fa): best_detection_at(test.scores[test.labels == 0],
                                                                   test.scores[test.labels == 1], fa)
                                        for fa in (0.01, 0.05, 0.1)},
        "labelled": labelled_study(test.scores, test.labels, args.rules.split(","), args.labelled, args.draws,
                                   args.seed, held if holdout else None),
        "normal_only": normal_only_study(held, test.scores, test.labels,
                                         [int(s) for s in args.holdout_sizes.split(",")], args.target_fpr,
                                         args.draws, args.seed),
    }  # fmt: skip
    if args.choose_map:
        result["stages"] = stage_study(model, cfg, holdout or category.train, train, category.test, device,
                                       args.rules.split(","), args.labelled, args.draws, args.seed,
                                       pooled_holdout=bool(holdout))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["labelled"]:
        print(f"{row['rule']:>18} ({row['goods']}, pooled {row['pooled']}): recall {row['recall']['mean']:.3f}±{row['recall']['sd']:.3f} "
              f"fa {row['fa']['mean']:.3f}±{row['fa']['sd']:.3f} best {row['best']['mean']:.3f} "
              f"(estimated {row['est_recall']['mean']:.3f} / {row['est_fa']['mean']:.3f})")  # fmt: skip
    for row in result["normal_only"]:
        print(f"n={row['held_out']:3d} {row['method']:>26}: fa {row['fa']['mean']:.3f}±{row['fa']['sd']:.3f} "
              f"recall {row['recall']['mean']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
