"""What precedes a loss spike: reads a run's ``step_log.jsonl`` (``train.step_log: true``) and prints, for every
step whose loss exceeds ``--factor`` times the median of the ``--window`` steps before it (the first of a run of
such steps), the steps leading up to it: loss, gradient norm, the largest RMS(g^2 / v_hat) against Adam's second
moments and its tensor, the batch's synthetic-anomaly area.

Example:
    python benchmarks/spike_report.py runs/tire_s1_steplog --before 8
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def spikes(records: list[dict], factor: float, window: int) -> list[int]:
    """Indices of the first step of each run of steps with loss > factor x the median of the window before."""
    found, inside = [], False
    for i in range(window, len(records)):
        level = statistics.median(r["loss"] for r in records[i - window : i])
        high = records[i]["loss"] > factor * level
        if high and not inside:
            found.append(i)
        inside = high
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--factor", type=float, default=1.5)
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--before", type=int, default=8)
    args = p.parse_args(argv)
    records = [json.loads(line) for line in (args.run / "step_log.jsonl").read_text().splitlines() if line.strip()]
    found = spikes(records, args.factor, args.window)
    print(f"{len(records)} steps, {len(found)} spike(s) (loss > {args.factor} x the median of {args.window} before)")
    for i in found:
        print(f"\nspike at step {records[i]['step']}")
        print("  step    loss  grad_norm  ratio_max  area    tensor with the largest ratio")
        for r in records[max(0, i - args.before) : i + 3]:
            print(f"  {r['step']:4d}  {r['loss']:.4f}  {r['grad_norm']:9.3f}  {r['ratio_max']:9.2f}  "
                  f"{r['anomaly_area']:.3f}  {r['ratio_tensor']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
