"""Tables from cell records: the summary CSV, markdown tables per dataset (the paper's row beside ours where the
dataset is one of the paper's), and the generated blocks of the results page.

A results page marks each generated table with a pair of HTML comments::

    <!-- benchmark: results/dev.json table=quality -->
    ...generated, do not edit...
    <!-- /benchmark -->

``render_page`` rewrites every block from the named file (relative to the page), so the page is the output of the
records it names; ``check=True`` reports the blocks that differ instead of writing. A block with ``figure=KIND``
instead of ``table=KIND`` draws PNGs into the page's ``figures/`` folder (:mod:`dmdd.benchmark.figures`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from dmdd.benchmark.figures import FIGURES, peers_and_pace
from dmdd.benchmark.paper import MEANS, paper_row
from dmdd.errors import ConfigError

QUALITY = [("I-AUROC", "image_auroc"), ("P-AUROC", "pixel_auroc"), ("AU-PRO", "au_pro"), ("I-F1max", "image_f1_max")]
CSV_FIELDS = ["id", "dataset", "category", "model", "kind", "backbone", "budget", "seed", "image_auroc", "pixel_auroc",
              "au_pro", "image_f1_max", "pixel_f1_max", "false_alarm_rate", "detection_rate", "train_minutes",
              "train_steps", "step_seconds", "images_per_s", "peak_rss_mib", "peak_gpu_mib", "device", "git_commit"]  # fmt: skip


def flat(record: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a cell record (rates and metrics as fractions, as stored)."""
    m, train, decisions = record["metrics"], record.get("train") or {}, record["metrics"].get("decisions") or {}
    return {"id": record["id"], "dataset": record["dataset"], "category": record["category"], "model": record["model"],
            "kind": record["kind"], "backbone": record.get("backbone"), "budget": record["budget_label"],
            "seed": record["seed"], **{k: m.get(k) for _, k in QUALITY}, "pixel_f1_max": m.get("pixel_f1_max"),
            "false_alarm_rate": decisions.get("false_alarm_rate"), "detection_rate": decisions.get("detection_rate"),
            "train_minutes": round(train["seconds"] / 60, 2) if train.get("seconds") is not None else None,
            "train_steps": train.get("steps"), "step_seconds": train.get("step_seconds"),
            "images_per_s": (record.get("inference") or {}).get("images_per_s"),
            "peak_rss_mib": record["memory"]["peak_rss_mib"], "peak_gpu_mib": record["memory"]["peak_gpu_mib"],
            "device": record["environment"]["device_name"], "git_commit": record["environment"]["git_commit"]}  # fmt: skip


def csv_text(records: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat(r) for r in records)
    return buffer.getvalue()


def _pct(values: list[float | None]) -> str:
    """Mean in % over seeds, with the spread (max - min) / 2 when there are several; '-' when undefined."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    text = f"{100 * mean(values):.2f}"
    return text + (f" ± {50 * (max(values) - min(values)):.2f}" if len(values) > 1 else "")


def _num(values: list[float | None], digits: int) -> str:
    values = [v for v in values if v is not None]
    return f"{mean(values):.{digits}f}" if values else "-"


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(category, model, budget) -> the records of its seeds, in first-seen order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["category"], r["model"], r["budget_label"])].append(r)
    return groups


def _mean_over_categories(per_cat: dict[str, list[dict[str, Any]]], key: str) -> float | None:
    """The mean over categories of each category's mean over seeds; None when a category lacks the value."""
    per_category = [[x[key] for x in rows if x[key] is not None] for rows in per_cat.values()]
    return mean(mean(v) for v in per_category) if all(per_category) else None


def quality_table(records: list[dict[str, Any]]) -> str:
    """One row per category x model x budget (mean ± half-range over seeds), a mean row per model x budget over the
    categories, and the paper's row where the dataset is one of the paper's."""
    head = ["category", "model", "budget", *[name for name, _ in QUALITY], "false alarms", "detected", "train min",
            "img/s", "peak MiB", "seeds"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = _groups(records)
    paper = next((r.get("paper") for r in records if r.get("paper")), None)
    for (category, model, budget), rs in groups.items():
        rows = [flat(r) for r in rs]
        cells = [category, model, budget, *[_pct([x[k] for x in rows]) for _, k in QUALITY],
                 _pct([x["false_alarm_rate"] for x in rows]), _pct([x["detection_rate"] for x in rows]),
                 _num([x["train_minutes"] for x in rows], 1), _num([x["images_per_s"] for x in rows], 1),
                 _num([x["peak_rss_mib"] for x in rows], 0), str(len(rows))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    categories = sorted({c for c, _, _ in groups})
    if paper:
        for category in categories:
            row = paper_row(paper, category)
            if row:
                lines.append("| " + " | ".join([category, "paper (WRN50-2)", "-", *[f"{v:.2f}" if v is not None
                             else "-" for v in row], "-", "-", "-", "-", "-", "-", "-"]) + " |")  # fmt: skip
    if len(categories) > 1:
        by_model: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(dict)
        for (category, model, budget), rs in groups.items():
            by_model[(model, budget)][category] = [flat(r) for r in rs]
        for (model, budget), per_cat in by_model.items():
            if set(per_cat) != set(categories):
                continue  # a mean over some categories only would mislead
            means = [_pct([_mean_over_categories(per_cat, k)]) for _, k in QUALITY]
            lines.append("| " + " | ".join(["**mean**", model, budget, *means, *["-"] * 5, "-"]) + " |")
        if paper and paper in MEANS:
            lines.append("| " + " | ".join(["**mean**", "paper (WRN50-2)", "-", *[f"{v:.2f}" if v is not None
                         else "-" for v in MEANS[paper]], "-", *["-"] * 5]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def per_type_table(records: list[dict[str, Any]]) -> str:
    """One row per model x defect type (first seed of each cell): image AUROC against the good images, pixel AUROC,
    AU-PRO, and the share flagged at the stored threshold."""
    head = ["category", "model", "budget", "defect type", "I-AUROC", "P-AUROC", "AU-PRO", "detected"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (category, model, budget), rs in _groups(records).items():
        metrics = rs[0]["metrics"]
        detected = ((metrics.get("decisions") or {}).get("per_defect_type")) or {}
        for kind, m in sorted(metrics["per_defect_type"].items()):
            quality = [_pct([m.get(k)]) for k in ("image_auroc", "pixel_auroc", "au_pro")]
            cells = [category, model, budget, kind, *quality, _pct([detected.get(kind)])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_table(records: list[dict[str, Any]]) -> str:
    """Per cell: device, training steps and minutes, seconds per student step, inference images/s, peak memory."""
    head = ["dataset", "category", "model", "budget", "device", "steps", "train min", "s/step", "img/s", "peak RSS MiB",
            "peak GPU MiB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        x = flat(r)
        lines.append("| " + " | ".join(str(v if v is not None else "-") for v in [
            x["dataset"], x["category"], x["model"], x["budget"], x["device"], x["train_steps"], x["train_minutes"],
            x["step_seconds"], x["images_per_s"], x["peak_rss_mib"], x["peak_gpu_mib"]]) + " |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _three_metrics(rows: list[dict[str, Any]] | None) -> str:
    """I-AUROC / P-AUROC / AU-PRO of flat rows (the mean over seeds), '-' without rows."""
    if not rows:
        return "-"
    return " / ".join(_pct([x[k] for x in rows]) for k in ("image_auroc", "pixel_auroc", "au_pro"))


def backbones_table(records: list[dict[str, Any]]) -> str:
    """One row per category and backbone, one column per model kind and budget: I-AUROC / P-AUROC / AU-PRO (the
    mean over seeds), so that models with the same backbone sit side by side."""
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[(r["category"], r.get("backbone") or "-")][f"{r['kind']} {r['budget_label']}"].append(flat(r))
    columns = sorted({c for g in groups.values() for c in g})
    lines = ["| category | backbone | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for (category, backbone), by_column in groups.items():
        cells = []
        for c in columns:
            rows = by_column.get(c)
            cells.append(_three_metrics(rows))
        lines.append(f"| {category} | {backbone} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def budgets_table(records: list[dict[str, Any]]) -> str:
    """Cells trained for a number of minutes (``--minutes``): the budget against the minutes the fit took, setup and
    the final calibration included (what the budget counts), with the steps it planned and the commit."""
    head = ["category", "model", "budget min", "fit min", "used", "steps", "s/step", "commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        minutes, fit = (r.get("budget") or {}).get("minutes"), (r.get("train") or {}).get("fit_seconds")
        if minutes is None or fit is None:
            continue
        cells = [r["category"], r["model"], f"{minutes:g}", f"{fit / 60:.2f}", f"{100 * fit / (60 * minutes):.1f} %",
                 r["train"].get("steps"), r["train"].get("step_seconds"), r["environment"]["git_commit"][:7]]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def curve_table(records: list[dict[str, Any]]) -> str:
    """Learning curves of the cells that kept snapshots: P-AUROC / AU-PRO (I-AUROC) at the first snapshot at or
    after each multiple of ``train.snapshot_every`` (snapshots come at epoch ends, so the step, after ``@``, may
    pass the mark)."""
    records = [r for r in records if r.get("curve")]

    def mark(r: dict[str, Any], step: int) -> int:
        every = int(r["config"]["train"].get("snapshot_every") or 1)
        return step // every * every

    marks = sorted({mark(r, c["step"]) for r in records for c in r["curve"]})
    head = ["category", "model", "s/step", *[f"step {m}" for m in marks]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        at = {mark(r, c["step"]): c for c in r["curve"]}
        cells = [r["category"], r["model"], r["train"].get("step_seconds") or "-"]
        for m in marks:
            c = at.get(m)
            cells.append("-" if c is None else f"{100 * c['pixel_auroc']:.2f} / {100 * c['au_pro']:.2f} "
                         f"({100 * c['image_auroc']:.1f})" + (f" @{c['step']}" if c["step"] != m else ""))  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _first_reached(curve: list[dict], peer: dict, keys: list[str], step_seconds: float | None) -> str:
    for c in curve:
        if all(c[k] >= peer[k] for k in keys):
            return (f"{c['step'] * step_seconds / 60:.1f} min " if step_seconds else "") + f"@{c['step']}"
    return f"not in {curve[-1]['step']} steps"


def to_peer_table(records: list[dict[str, Any]]) -> str:
    """Time to a peer's maps: for each cell with a learning curve, the first snapshot whose P-AUROC, AU-PRO, and
    both, reach those of PatchCore with the same backbone on the same category, as the step (after ``@``) and the
    minutes of student steps (setup not counted) at the seconds per step of the speed suite's cell with that
    backbone where its records are pooled in (measured alone), else at the cell's own."""
    peers, alone = peers_and_pace(records)
    head = ["category", "backbone", "patchcore P-AUROC / AU-PRO", "dmdd last snapshot", "P-AUROC reached",
            "AU-PRO reached", "both reached"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        peer = peers.get((r["category"], r.get("backbone")))
        if not r.get("curve") or peer is None:
            continue
        step_seconds = alone.get(r.get("backbone"), r["train"].get("step_seconds"))
        last = r["curve"][-1]
        cells = [r["category"], r.get("backbone") or "-", f"{100 * peer['pixel_auroc']:.2f} / {100 * peer['au_pro']:.2f}",
                 f"{100 * last['pixel_auroc']:.2f} / {100 * last['au_pro']:.2f} @{last['step']}",
                 *[_first_reached(r["curve"], peer, keys, step_seconds)
                   for keys in (["pixel_auroc"], ["au_pro"], ["pixel_auroc", "au_pro"])]]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_table(records: list[dict[str, Any]]) -> str:
    """The ablations side by side: one row per switch, one column per category and backbone where some switch ran,
    I-AUROC / P-AUROC / AU-PRO (the mean over seeds). A dmdd model named ``dmdd-<backbone>-<switch>`` is that switch,
    ``dmdd-<backbone>`` the default configuration; other kinds are left out."""
    cells: dict[str, dict[tuple[str, str], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["kind"] == "dmdd":
            switch = r["model"].split("-", 2)[2] if r["model"].count("-") >= 2 else "default"
            cells[switch][(r["category"], r.get("backbone") or "-")].append(flat(r))
    columns = list(dict.fromkeys(c for switch, by in cells.items() if switch != "default" for c in by))
    lines = ["| switch | " + " | ".join(f"{c} {b}" for c, b in columns) + " |", "|---|" + "---|" * len(columns)]
    for switch in sorted(cells, key=lambda s: s != "default"):  # the default first, then in first-seen order
        row = [cells[switch].get(c) for c in columns]
        if any(row):
            lines.append(f"| {switch} | " + " | ".join(_three_metrics(rows) for rows in row) + " |")
    return "\n".join(lines) + "\n"


def suite_markdown(records: list[dict[str, Any]]) -> str:
    """One quality table per dataset, then the speed table."""
    parts = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        parts += [f"### {dataset}", "", quality_table([r for r in records if r["dataset"] == dataset])]
    if records:
        parts += ["### Speed and memory", "", speed_table(records)]
    return "\n".join(parts)


def json_table(data: dict[str, Any]) -> str:
    """A two-column table of a flat JSON object's scalar entries (driver outputs such as the serve load test)."""
    lines = ["| quantity | value |", "|---|---|"]
    for key, value in data.items():
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            lines.append(f"| {key} | {round(value, 2) if isinstance(value, float) else value} |")
    return "\n".join(lines) + "\n"


def deploy_table(data: dict[str, Any]) -> str:
    """benchmarks/deploy_runtimes.py's output: images/s (median, min-max) and metrics per runtime."""
    head = ["runtime", "img/s (min-max)", "I-AUROC", "P-AUROC", "AU-PRO", "max map diff / map scale"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in data["rows"].items():
        lines.append(f"| {name} | {r['images_per_s']:.1f} ({r['min_images_per_s']:.1f}-{r['max_images_per_s']:.1f}) "
                     f"| {100 * r['image_auroc']:.2f} | {100 * r['pixel_auroc']:.2f} | {100 * r['au_pro']:.2f} "
                     f"| {r['max_rel_map_diff']:.1e} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _mean_sd(entry: dict[str, float]) -> str:
    return f"{100 * entry['mean']:.1f} ± {100 * entry['sd']:.1f}"


def labelled_table(data: dict[str, Any]) -> str:
    """benchmarks/thresholds.py, part 1: rules set on a few labelled test images, measured on the rest."""
    head = ["rule", "labelled", "good images", "draws", "recall", "false alarms", "best recall at those false alarms",
            "estimated recall / false alarms"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["labelled"]:
        estimate = f"{100 * r['est_recall']['mean']:.1f} / {100 * r['est_fa']['mean']:.1f}"
        goods = r.get("goods", "labelled only")  # files written before held-out images were pooled
        if r["rule"] == "f1":  # f1 never pools
            goods = "labelled only"
        elif goods == "labelled":
            goods = f"labelled + held-out in {r['pooled']} draws"
        cells = [r["rule"], r["labelled"], goods, r["draws"], _mean_sd(r["recall"]), _mean_sd(r["fa"]),
                 _mean_sd(r["best"])]  # fmt: skip
        lines.append("| " + " | ".join(map(str, [*cells, estimate])) + " |")
    return "\n".join(lines) + "\n"


def stages_table(data: dict[str, Any]) -> str:
    """benchmarks/thresholds.py, part 3: the map chosen by a few labelled images against the trained map, on the rest
    of the test split (mean ± sd over draws); how often each candidate was chosen."""
    st = data["stages"]
    head = ["labelled", "draws", "chosen", "P-AUROC: chosen / trained map", "AU-PRO", "I-AUROC",
            "best recall at 10 % false alarms"]  # fmt: skip
    chosen = ", ".join(f"{name} {count}" for name, count in st["chosen"].items() if count)
    cells = [st["labelled"], st["draws"], chosen]
    for key in ("pixel_auroc", "au_pro", "image_auroc", "best_recall_at_10"):
        cells.append(f"{_mean_sd(st['rest']['chosen'][key])} / {_mean_sd(st['rest']['all'][key])}")
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      "| " + " | ".join(map(str, cells)) + " |"]) + "\n"  # fmt: skip


def stage_rules_table(data: dict[str, Any]) -> str:
    """benchmarks/thresholds.py, part 3: each rule's decisions with the chosen map, on the rest of the test split."""
    head = ["rule", "labelled", "recall", "false alarms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["stages"]["rules"]:
        lines.append(f"| {r['rule']} | {data['stages']['labelled']} | {_mean_sd(r['recall'])} | {_mean_sd(r['fa'])} |")
    return "\n".join(lines) + "\n"


def tiles_speed_table(data: dict[str, Any]) -> str:
    """benchmarks/small_defects.py speed: seconds per camera-size image and peak memory per checkpoint."""
    head = ["model", "tile", "image", "threads", "s/image", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in data["rows"]:
        path = Path(r["checkpoint"])
        name = path.parent.parent.name if path.parent.name == "run" else str(path)
        cells = [name, r["tile"] or "-", f"{r['width']}x{r['height']} ({r['megapixels']} MP)", r.get("threads", "-"),
                 r["seconds_per_image"], r["peak_rss_mib"]]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def normal_only_table(data: dict[str, Any]) -> str:
    """benchmarks/thresholds.py, part 2: thresholds from a few held-out good images, measured on the test split; one
    row per hold-out size, dmdd's rule beside the maximum used before."""
    head = ["held-out good images", "draws", "dmdd's threshold", "false alarms", "recall", "maximum: false alarms",
            "recall"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_size: dict[int, dict[str, dict]] = {}
    for r in data["normal_only"]:
        by_size.setdefault(r["held_out"], {})["before" if r["method"].startswith("before") else "dmdd"] = r
    for size, rows in by_size.items():
        ours, before = rows["dmdd"], rows["before"]
        cells = [size, ours["draws"], ours["method"].removeprefix("dmdd: "), _mean_sd(ours["fa"]),
                 _mean_sd(ours["recall"]), _mean_sd(before["fa"]), _mean_sd(before["recall"])]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def serve_load_table(data: dict[str, Any]) -> str:
    """benchmarks/serve_load.py's output in one row."""
    head = ["clients", "server threads", "requests", "errors", "p50 ms", "p99 ms", "images/s", "server RSS MiB"]
    cells = [data["clients"], data["server_threads"], data["requests"], data["errors"], f"{data['p50_ms']:.0f}",
             f"{data['p99_ms']:.0f}", f"{data['throughput_per_s']:.1f}",
             f"{data['server_rss_mib_after_warmup']:.0f} -> {data['server_rss_mib_end']:.0f}"]  # fmt: skip
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      "| " + " | ".join(map(str, cells)) + " |"]) + "\n"  # fmt: skip


def _pct_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def maps_table(data: dict[str, Any]) -> str:
    """benchmarks/diagnose.py, part 1: P-AUROC / AU-PRO of the model's fusion and of single maps and subsets, one
    column per category."""
    sets = data["sets"]
    lines = ["| maps fused | " + " | ".join(s["category"] for s in sets) + " |", "|---|" + "---|" * len(sets)]
    by_set = [{r["variant"]: r for r in s["maps"]} for s in sets]
    for variant in dict.fromkeys(v for rows in by_set for v in rows):
        cells = [f"{_pct_or_dash(rows[variant]['pixel_auroc'])} / {_pct_or_dash(rows[variant]['au_pro'])}"
                 if variant in rows else "-" for rows in by_set]  # fmt: skip
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def map_types_table(data: dict[str, Any]) -> str:
    """benchmarks/diagnose.py, part 1 per defect type: P-AUROC / AU-PRO of the fusion, of each stage and branch
    alone and with and without the regional map, on each type's images with the good ones, for the categories with
    several types (each type's share of the defect pixels in the header)."""
    shown = re.compile(r"default .*|.* alone|.* only|without the regional map")
    lines = []
    for s in data["sets"]:
        rows = [r for r in s["maps"] if r.get("per_type") and shown.fullmatch(r["variant"])]
        if not rows:
            continue
        kinds = list(rows[0]["per_type"])
        shares = s.get("defect_pixel_share", {})
        head = [f"{s['category']}: maps fused"] + [
            f"{k} ({100 * shares[k]:.0f} % of defect pixels)" if k in shares else k for k in kinds]
        lines += [""] * bool(lines) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # one table per set
        for r in rows:
            cells = [f"{_pct_or_dash(r['per_type'][k]['pixel_auroc'])} / {_pct_or_dash(r['per_type'][k]['au_pro'])}"
                     for k in kinds]  # fmt: skip
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def regions_table(data: dict[str, Any]) -> str:
    """benchmarks/diagnose.py, part 2: per image region, where the pixels are and where each model's false alarms
    fall at the threshold that flags 1 % of all good pixels (regions without pixels left out)."""
    head = ["category", "model", "region", "good pixels", "defect pixels", "P-AUROC inside",
            "share of false alarms", "false-alarm rate", "defect pixels flagged"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in data["sets"]:
        for r in s["regions"]:
            if not r["good_pixel_share"] and not r["defect_pixel_share"]:
                continue
            cells = [s["category"], r["model"], r["region"], _pct_or_dash(r["good_pixel_share"]),
                     _pct_or_dash(r["defect_pixel_share"]), _pct_or_dash(r["pixel_auroc"]),
                     _pct_or_dash(r["false_alarm_share"]), _pct_or_dash(r["false_alarm_rate"]),
                     _pct_or_dash(r["defect_recall"])]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RENDERERS = {"quality": quality_table, "speed": speed_table, "per_type": per_type_table, "curve": curve_table,
             "backbones": backbones_table, "budgets": budgets_table, "to_peer": to_peer_table,
             "ablation": ablation_table}  # fmt: skip
FILE_RENDERERS = {"json": json_table, "deploy": deploy_table, "labelled": labelled_table,
                  "normal_only": normal_only_table, "tiles_speed": tiles_speed_table, "serve_load": serve_load_table,
                  "maps": maps_table, "map_types": map_types_table, "regions": regions_table, "stages": stages_table,
                  "stage_rules": stage_rules_table}  # fmt: skip
_BLOCK = re.compile(r"(<!-- benchmark: (\S+)(?: (table|figure)=(\w+))? -->\n)(.*?)(<!-- /benchmark -->)", re.S)


def _load(source: Path) -> dict[str, Any]:
    if not source.is_file():
        raise ConfigError(f"results file not found: {source} (named by a '<!-- benchmark: ... -->' block)")
    return json.loads(source.read_text())


def render_block(sources: Path | list[Path], kind: str) -> str:
    """The table of one block. Several files (``a.json,b.json`` in the block): suite records are pooled into one
    table; a driver's tables are stacked under one header with a first column naming each file's label (default:
    its category)."""
    sources = [sources] if isinstance(sources, Path) else sources
    if kind not in FILE_RENDERERS and kind not in RENDERERS:
        known = sorted(RENDERERS | FILE_RENDERERS)
        raise ConfigError(f"unknown table kind {kind!r} for {', '.join(map(str, sources))}; known: {known}")
    data = [_load(source) for source in sources]
    if kind in RENDERERS:
        return RENDERERS[kind]([cell for d in data for cell in d["cells"]])
    if len(data) == 1:
        return FILE_RENDERERS[kind](data[0])
    lines: list[str] = []
    for source, d in zip(sources, data):
        head, sep, *rows = FILE_RENDERERS[kind](d).splitlines()
        if not lines:
            lines = ["| set " + head, "|---" + sep]
        lines += [f"| {d.get('label') or d.get('category', source.stem)} " + row for row in rows]
    return "\n".join(lines) + "\n"


def render_figure(sources: list[Path], kind: str, figures: Path, write: bool) -> tuple[str, list[Path]]:
    """The image links of one figure block, with its PNGs written into ``figures`` (when ``write``); returns the
    links and the PNGs that do not exist."""
    if kind not in FIGURES:
        raise ConfigError(f"unknown figure kind {kind!r} for {', '.join(map(str, sources))}; known: {sorted(FIGURES)}")
    records = [cell for source in sources for cell in _load(source)["cells"]]
    body, paths = FIGURES[kind](records, figures, kind, write)
    return body, [p for p in paths if not p.is_file()]


def render_page(page: Path, check: bool = False) -> list[str]:
    """Regenerate every benchmark block of ``page``; returns the sources of the blocks that changed (with ``check``,
    nothing is written)."""
    text = page.read_text()
    changed: list[str] = []

    def sub(match: re.Match) -> str:
        source, what, kind = match.group(2), match.group(3) or "table", match.group(4) or "quality"
        sources = [page.parent / name for name in source.split(",")]
        if what == "figure":
            body, missing = render_figure(sources, kind, page.parent / "figures", write=not check)
        else:
            body, missing = render_block(sources, kind), []
        if body != match.group(5) or missing:
            changed.append(f"{source} {what}={kind}" + "".join(f" (missing {p})" for p in missing))
        return match.group(1) + body + match.group(6)

    new = _BLOCK.sub(sub, text)
    if not check and new != text:
        page.write_text(new)
    return changed
