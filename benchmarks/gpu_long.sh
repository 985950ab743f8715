#!/usr/bin/env bash
# Long training budgets on one lent GPU (offline, its own python3 + torch), written to fit one device call:
#   1. the engine's speed on real data after the one-DataLoader change (tire, 200 steps, 8 workers, alone);
#   2. three tire runs side by side on the one GPU, snapshots every 250 steps, each cut at 270 s if not done:
#      the default (constant paper rate) to 3000 steps, cosine decay over 1500 steps (about the steps 60 minutes
#      buy on 2 CPU cores), and a constant rate of 0.002 to 3000 steps;
#   3. the learning curve of every run from its snapshots (learning_curve.py --quick, model on the GPU).
# Needs the Lite0 wheels in .whl and the packed data in gpudata (benchmarks/pack_for_gpu.py); see results.md §13.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
DATA=${DATA:-gpudata}
RUNS=/tmp/runs; mkdir -p $RUNS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc; python3 -c "import torch; print('torch', torch.__version__)"
bench=(python3 benchmarks/real_data.py --category tire --data "$DATA")
t0=$(date +%s)

# 1. speed, alone on the machine
timeout 90 "${bench[@]}" --steps 200 --threads 4 --set train.num_workers=8 --out $RUNS/speed > $RUNS/speed.log 2>&1
echo "speed rc $? at $(( $(date +%s) - t0 )) s"
python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print('speed: steps', r[-1]['step'], 'student s per epoch', [x['student_seconds'] for x in r], 'steps per epoch', [b['step'] - a['step'] for a, b in zip([{'step': 0}] + r, r)])" $RUNS/speed/train_log.jsonl

# 2. three runs side by side
common=(--snapshot-every 250 --threads 2 --set train.num_workers=4)
timeout 270 "${bench[@]}" --steps 3000 "${common[@]}" --out $RUNS/const_3000 > $RUNS/const_3000.log 2>&1 &
timeout 270 "${bench[@]}" --steps 1500 "${common[@]}" --set train.lr_schedule=cosine --out $RUNS/cosine_1500 > $RUNS/cosine_1500.log 2>&1 &
timeout 270 "${bench[@]}" --steps 3000 "${common[@]}" --set train.lr=0.002 --set train.lr_pretrained=0.002 --out $RUNS/lr2e-3_3000 > $RUNS/lr2e-3_3000.log 2>&1 &
wait
echo "runs done at $(( $(date +%s) - t0 )) s"; ls $RUNS/*/snapshots

# 3. learning curves from the snapshots
for r in const_3000 cosine_1500 lr2e-3_3000; do
  timeout 130 python3 benchmarks/learning_curve.py $RUNS/$r --category tire --data "$DATA" --quick --device cuda --threads 2 > $RUNS/$r.curve.log 2>&1 &
done
wait
echo "curves done at $(( $(date +%s) - t0 )) s"
for r in const_3000 cosine_1500 lr2e-3_3000; do echo "== $r"; cat $RUNS/$r/curve.md 2>/dev/null; tail -n 2 $RUNS/$r.log; done
cd $RUNS && tar czf "$OUT/gpu_long.tgz" --exclude='*.pt' --exclude='overlays' . && echo packed
