"""Markdown rows from benchmark.json files written by benchmarks/real_data.py.

python benchmarks/summarize.py runs/tire_lite0_lr5e-3 runs/tire_lite0_lr1e-4
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def row(name: str, m: dict) -> str:
    keys = ("image_auroc", "pixel_auroc", "au_pro", "image_f1_max", "pixel_f1_max")
    return f"| {name} | " + " | ".join(pct(m[k]) for k in keys) + " |"


def main(folders: list[str]) -> None:
    print("| run | I-AUROC | P-AUROC | AU-PRO | I-F1max | P-F1max |")
    print("|---|---|---|---|---|---|")
    for folder in folders:
        record = json.loads((Path(folder) / "benchmark.json").read_text())
        name = Path(folder).name
        print(row(f"{name} (MSN)", record["overall"]))
        if record.get("without_msn"):
            print(row(f"{name} (w/o MSN)", record["without_msn"]["overall"]))
    for folder in folders:
        r = json.loads((Path(folder) / "benchmark.json").read_text())
        t = r["thresholds"]
        print(
            f"\n{Path(folder).name}: {r['epochs']} epochs, train {r['train_seconds']} s, eval {r['eval_seconds']} s, "
            f"peak RSS {r['peak_rss_mib']} MiB, synthetic-validation I-AUROC {pct(t['synthetic_image_auroc'])}, "
            f"P-AUROC {pct(t['synthetic_pixel_auroc'])}; command: `{r['command']}`"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
