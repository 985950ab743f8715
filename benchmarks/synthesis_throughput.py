"""Throughput of normal/anomalous pair generation at 256 px on real data, cold and warm foreground cache.

python benchmarks/synthesis_throughput.py --category tire --pairs 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dmdd.config import SynthesisConfig
from dmdd.data import AnomalySynthesizer, PairDataset, load_category
from dmdd.data.foreground import ForegroundCache

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--category", default="tire")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args()
    records = load_category(DATA, args.category).train[: args.pairs]
    cfg = SynthesisConfig(texture_dir=str(DATA / "textures" / "dtd10"), foreground="object")
    synthesizer = AnomalySynthesizer(cfg)
    cache = ForegroundCache(cfg)

    start = time.perf_counter()  # cold: decoding + GrabCut for every image, then one pass of pairs
    pairs = PairDataset(records, args.size, synthesizer, seed=0, foregrounds=cache)
    for i in range(len(pairs)):
        pairs[i]
    cold = time.perf_counter() - start
    grabcuts = cache.computed

    start = time.perf_counter()  # warm: a new epoch over the same dataset, the cache is reused
    pairs.set_epoch(1)
    for i in range(len(pairs)):
        pairs[i]
    warm = time.perf_counter() - start
    print(
        json.dumps(
            {
                "category": args.category,
                "size": args.size,
                "pairs": len(pairs),
                "cold_pairs_per_s": round(len(pairs) / cold, 2),
                "grabcut_runs_cold": grabcuts,
                "warm_pairs_per_s": round(len(pairs) / warm, 2),
                "grabcut_runs_warm": cache.computed - grabcuts,
            }
        )
    )


if __name__ == "__main__":
    main()
