"""Figures of the results page, drawn from the same cell records as its tables.

A figure block names its records and a figure kind; ``render_page`` writes one PNG per category into the page's
``figures/`` folder and puts the image links between the markers::

    <!-- benchmark: results/dev.json,results/curves.json figure=time_to_quality -->
    ![...](figures/time_to_quality_tire.png)
    <!-- /benchmark -->

``--check`` compares the links and that each PNG exists, not the PNG bytes (they vary with the matplotlib version).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

METRICS = [("pixel_auroc", "P-AUROC"), ("au_pro", "AU-PRO")]


def peers_and_pace(records: list[dict[str, Any]]) -> tuple[dict[tuple, dict], dict[str | None, float]]:
    """PatchCore's metrics per (category, backbone), and the seconds per step per backbone of the speed suite's cells
    (measured alone on the machine) where their records are pooled in."""
    peers, alone = {}, {}
    for r in records:
        if r["kind"] == "patchcore":
            peers.setdefault((r["category"], r.get("backbone")), r["metrics"])
        elif r.get("suite") == "speed" and (r.get("train") or {}).get("step_seconds"):
            alone.setdefault(r.get("backbone"), r["train"]["step_seconds"])
    return peers, alone


def quality_against_minutes(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per category, one series per cell with a learning curve: its backbone, the minutes of student steps at each
    snapshot (at the speed suite's pace where pooled in, else the cell's own), P-AUROC and AU-PRO in %, and PatchCore's
    level with the same backbone (None where it was not run)."""
    peers, alone = peers_and_pace(records)
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if not r.get("curve"):
            continue
        pace = alone.get(r.get("backbone"), r["train"].get("step_seconds"))
        peer = peers.get((r["category"], r.get("backbone")))
        series[r["category"]].append({
            "model": r["model"], "backbone": r.get("backbone") or "-",
            "minutes": [c["step"] * pace / 60 for c in r["curve"]],
            **{k: [100 * c[k] for c in r["curve"]] for k, _ in METRICS},
            "peer": None if peer is None else {k: 100 * peer[k] for k, _ in METRICS}})  # fmt: skip
    return dict(series)


def _draw(category: str, series: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(10, 3.6))
    for i, s in enumerate(sorted(series, key=lambda s: s["backbone"])):
        colour = f"C{i}"
        for ax, (key, _) in zip(axes, METRICS):
            ax.plot(s["minutes"], s[key], "o-", color=colour, label=f"dmdd {s['backbone']}")
            if s["peer"] is not None:
                ax.axhline(s["peer"][key], color=colour, linestyle="--", label=f"PatchCore {s['backbone']}")
    for ax, (_, name) in zip(axes, METRICS):
        ax.set_xlabel("minutes of training steps (2 CPU cores)")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(f"{category}: {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def time_to_quality(records: list[dict[str, Any]], figures: Path, prefix: str, write: bool) -> tuple[str, list[Path]]:
    """One PNG per category of P-AUROC and AU-PRO against training minutes, a line per backbone and PatchCore's level
    dashed in the same colour; returns the markdown links (relative to ``figures``' parent) and the PNG paths."""
    lines, paths = [], []
    for category, series in quality_against_minutes(records).items():
        path = figures / f"{prefix}_{category}.png"
        if write:
            _draw(category, series, path)
        paths.append(path)
        lines.append(f"![{category}: P-AUROC and AU-PRO against minutes of training, per backbone, PatchCore dashed]"
                     f"({figures.name}/{path.name})")  # fmt: skip
    return "\n".join(lines) + "\n", paths


FIGURES = {"time_to_quality": time_to_quality}
