#!/usr/bin/env bash
# make gpu-check: the GPU path end to end on one CUDA device, with the same code and commands as on CPU.
#   1. the fashion-mnist-15min and fashion-mnist-resnet18 recipes, clock from packing to the written summary
#      (launch/time_to_accuracy.py with accelerate_configs/single_gpu.yaml, bf16), global batch 256 as tuned;
#   2. fp16 (the GradScaler path, which CPUs never run) with --sync-bn, a mid-run checkpoint and a resume;
#   3. torch.compile, and the step benchmark (ours vs a plain PyTorch loop; bf16 + channels_last vs fp32).
# Writes everything under $OUT (default results/gpu-check): one log per step and summary.txt.
# Needs: a CUDA GPU, the Fashion-MNIST IDX files in $FMNIST, and webdataset importable (bench's baseline).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-check}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
EXTRA=${EXTRA:-}  # e.g. "--max-steps 5" for a smoke run of the script itself
ACC="$PY -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml"
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_SILENT=true PYTHONUNBUFFERED=1
mkdir -p "$OUT"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary "[$name] exit $rc in $((SECONDS - t0)) s"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' | tee "$OUT/summary.txt"
$PY -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/summary.txt"

for run in fashion-mnist-15min:94.0:15 fashion-mnist-resnet18:94.9:60; do
  IFS=: read -r recipe goal budget <<<"$run"
  step "tta-$recipe" 300 $PY launch/time_to_accuracy.py --recipe $recipe --root "$FMNIST" --out "$WORK/$recipe" \
    --goal $goal --budget $budget --launch "$ACC" --batch-size 256 --num-workers 8 --wandb-mode disabled $EXTRA
  $PY - "$WORK/$recipe" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
r = json.load(open(sys.argv[1] + "/result.json"))
s = json.load(open(sys.argv[1] + "/run/summary.json"))
print(f"  test top-1 {r['test_top1']:.2f}% after {r['wall_minutes']:.2f} min (packing {r['pack_minutes']:.2f} min); "
      f"train {s.get('train_img_per_s', 0):,.0f} img/s; {s.get('diagnosis', '')}")
PY
  cp "$WORK/$recipe/result.json" "$OUT/result-$recipe.json" 2>/dev/null
done

SHARDS=$WORK/fashion-mnist-15min/shards
step fp16-syncbn 240 $ACC --mixed_precision fp16 launch/train.py --data "$SHARDS" --out "$WORK/fp16" \
  --recipe fashion-mnist-demo --batch-size 256 --num-workers 8 --sync-bn --max-steps 300 --checkpoint-every 100 \
  --wandb-mode disabled
step fp16-resume 240 $ACC --mixed_precision fp16 launch/train.py --data "$SHARDS" --out "$WORK/fp16" \
  --recipe fashion-mnist-demo --batch-size 256 --num-workers 8 --sync-bn --max-steps 400 --checkpoint-every 100 \
  --wandb-mode disabled
grep -hiE "resum|skipped|diagnosis|test top-1" "$OUT/fp16-syncbn.log" "$OUT/fp16-resume.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"

step compile 300 $ACC launch/train.py --data "$SHARDS" --out "$WORK/compile" --recipe fashion-mnist-demo \
  --batch-size 256 --num-workers 8 --compile --max-steps 400 --wandb-mode disabled
grep -hiE "diagnosis|test top-1" "$OUT/compile.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"

step bench-step 300 $PY -m resnet_dist.bench step --json "$OUT/bench-step.json" --step-batch 256
grep -E "ratio|x " "$OUT/bench-step.log" | head -20 | sed 's/^/  /' | tee -a "$OUT/summary.txt"
rm -rf "$WORK"
