"""Contact sheet of Foreground-aware Anomaly Synthesis on real data.

Rows: 8 training images of each category; columns: good image | foreground | synthetic anomaly | mask.

    python scripts/contact_sheet.py --out docs/figures/fas_contact_sheet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from dmdd.config import SynthesisConfig
from dmdd.data import AnomalySynthesizer, PairDataset, load_category
from dmdd.data.foreground import ForegroundCache

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def sheet_rows(category: str, count: int, size: int, seed: int) -> list[np.ndarray]:
    cat = load_category(DATA, category)
    records = cat.train[:: len(cat.train) // count][:count]
    cfg = SynthesisConfig(texture_dir=str(DATA / "textures" / "dtd10"))
    pairs = PairDataset(records, size, AnomalySynthesizer(cfg), seed, ForegroundCache(cfg))
    rows = []
    for i in range(len(pairs)):
        normal, anomalous, mask = pairs.pair(i, np.random.default_rng([seed, len(category), i]))
        fg = np.repeat((pairs.masks[i].astype(np.uint8) * 255)[..., None], 3, axis=2)
        m = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
        tiles = [normal, fg, (anomalous * 255).round().astype(np.uint8), m]
        gap = np.full((size, 4, 3), 255, np.uint8)
        row = np.concatenate([t for tile in tiles for t in (tile, gap)][:-1], axis=1)
        label = f"{category} ({pairs.policy})"
        cv2.putText(row, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 0), 1, cv2.LINE_AA)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/figures/fas_contact_sheet.png")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rows = sheet_rows("tire", 8, args.size, args.seed) + sheet_rows("magnetic_tile", 8, args.size, args.seed)
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    sheet = np.concatenate([r for row in rows for r in (row, gap)][:-1], axis=0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
    main()
