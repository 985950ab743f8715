"""Several learning curves in one figure: the default map's I-AUROC, P-AUROC and AU-PRO against steps.

Each series is a ``curve.jsonl`` / ``curve_training.jsonl`` written by ``learning_curve.py``; a Markdown table of
the same numbers goes next to the figure.

Example:
    python benchmarks/compare_curves.py --title "tire, 500 steps" --out benchmarks/figures/ema_tire.png \\
        "constant lr, last weights=runs/ema_tire_constant/curve_training.jsonl" \\
        "constant lr, EMA 0.99=runs/ema_tire_constant/curve.jsonl"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("au_pro", "AU-PRO"))


def load(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("series", nargs="+", help="LABEL=PATH of a curve .jsonl")
    p.add_argument("--out", required=True, help="PNG path; the table goes to the same name with .md")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    series = [(label, load(Path(path))) for label, path in (s.rsplit("=", 1) for s in args.series)]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
    for ax, (key, name) in zip(axes, METRICS):
        for label, rows in series:
            ax.plot([r["step"] for r in rows], [100 * r["default"][key] for r in rows], marker="o", ms=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("student steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (default map, test split)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(args.title)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    steps = sorted({r["step"] for _, rows in series for r in rows})
    lines = ["| step | " + " | ".join(label for label, _ in series) + " |", "|---|" + "---|" * len(series)]
    for step in steps:
        cells = []
        for _, rows in series:
            row = next((r for r in rows if r["step"] == step), None)
            cells.append(" / ".join(f"{100 * row['default'][k]:.1f}" for k, _ in METRICS) if row else "-")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
