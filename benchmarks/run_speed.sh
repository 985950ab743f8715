#!/usr/bin/env bash
# Issue 12's measurements, one after the other, alone on the machine (2 threads each). Writes benchmarks/speed/*.
# Needs .venv (make install), .venv-anomalib (see vs_anomalib.py) and a trained tire model (CKPT, default below).
set -euo pipefail
cd "$(dirname "$0")"
CKPT=${CKPT:-../runs/curve_tire/default_topk.pt}
mkdir -p speed
../.venv/bin/python profile_step.py --threads 2 --reps 5 --out speed/profile_contiguous.json > speed/profile_contiguous.txt
../.venv/bin/python profile_step.py --threads 2 --reps 5 --channels-last --out speed/profile_channels_last.json > speed/profile_channels_last.txt
../.venv/bin/python speed_levers.py --threads 2 --reps 5 --checkpoint "$CKPT" --out speed/levers.json
DMDD_MALLOC_TUNING=0 ../.venv/bin/python speed_levers.py --threads 2 --reps 5 --checkpoint "$CKPT" --out speed/levers_untuned_allocator.json
../.venv-anomalib/bin/python vs_anomalib.py --speed-only --reps 5 --speed-out speed/speed_table.json
../.venv/bin/python deploy_runtimes.py "$CKPT" --category tire --threads 2 --reps 5 --out ../runs/deploy_tire
cp ../runs/deploy_tire/deploy.json speed/deploy_tire.json
../.venv/bin/python speed_levers.py --threads 2 --reps 5 --compile --checkpoint "$CKPT" --out speed/levers_compile.json
