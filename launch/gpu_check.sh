#!/usr/bin/env bash
# make gpu-check: every CUDA path of the trainer on one GPU, with the same code and commands as on CPU, in
# about 6 minutes. Writes $OUT (default results/gpu-check): one log per step, summary.txt, the bench JSONs.
#   1. GPU JPEG decode (nvJPEG, batched) vs CPU decode, on real photographs (150-600 px, q75-95);
#   2. variable-size photo shards trained with RandomResizedCrop, --decode gpu vs --decode cpu;
#   3. the step benchmark: ResNet-18 at 32 px (with --compile on/off) and ResNet-50 at 224 px, each against a
#      plain PyTorch loop, fp32 NCHW and bf16 channels_last;
#   4. fp16 (GradScaler) with --sync-bn (torch's SyncBatchNorm in a 1-GPU group), a checkpoint and a resume;
#   5. the fashion-mnist-15min recipe timed from packing to summary (pinned memory, non-blocking copies).
# Without a GPU it runs what a CPU can (2, 3, 5 on the CPU) and says what it skipped.
# Needs: the Fashion-MNIST IDX files in $FMNIST, scikit-image (photographs) and webdataset (the [bench] extra).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-check}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
PY=${PYTHON:-python3}
ACC="$PY -m accelerate.commands.launch --config_file accelerate_configs/single_gpu.yaml"
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} WANDB_SILENT=true PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/summary.txt"
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, keep the log, record the exit code
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary "[$name] exit $rc in $((SECONDS - t0)) s"
  return $rc
}
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$GPU" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /' | tee -a "$OUT/summary.txt"
  DECODE=gpu
else
  summary "no CUDA device: skipping the nvJPEG decode, --decode gpu, fp16 and torch's SyncBatchNorm; the rest runs on the CPU"
  DECODE=cpu
fi
$PY -c "import torch, torchvision, accelerate, os; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__, 'cpus', os.cpu_count())" | tee -a "$OUT/summary.txt"

# 1. decode rate, and the photo shards for 2
step decode 120 $PY - "$WORK" <<'PY'
import json, sys, time
from pathlib import Path
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from resnet_dist.bench.photos import photo_jpegs, write_imagefolder
work = Path(sys.argv[1])
images = photo_jpegs(2048, seed=0)
for split, part in (("train", images[:1792]), ("val", images[1792:])):
    write_imagefolder(part, work / "photos", split)
payloads = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d, _ in images[:512]]
torch.set_num_threads(1)
def rate(fn, n=3):
    fn()
    best = 0.0
    for _ in range(n):
        t = time.perf_counter(); fn(); best = max(best, len(payloads) / (time.perf_counter() - t))
    return best
row = {"images": len(payloads), "cpu_1_thread_img_per_s": rate(lambda: [decode_jpeg(p, mode=ImageReadMode.RGB) for p in payloads])}
if torch.cuda.is_available():
    def gpu():
        out = decode_jpeg(payloads, mode=ImageReadMode.RGB, device="cuda"); torch.cuda.synchronize(); return out
    row["gpu_batched_img_per_s"] = rate(gpu)
    row["ratio_gpu_vs_one_core"] = row["gpu_batched_img_per_s"] / row["cpu_1_thread_img_per_s"]
print(json.dumps(row))
(Path(sys.argv[1]) / "decode.json").write_text(json.dumps(row))
PY
cp "$WORK/decode.json" "$OUT/decode.json" 2>/dev/null && summary "  decode: $(cat "$OUT/decode.json")"
step pack-photos 120 $PY -m resnet_dist.shard imagefolder --root "$WORK/photos" --out "$WORK/photo-shards" --shard-size 256

# 2. variable-size training with RandomResizedCrop: GPU decode vs CPU decode, same everything else
for decode in $DECODE cpu; do
  step "rrc-decode-$decode" 200 $ACC launch/train.py --data "$WORK/photo-shards" --out "$WORK/rrc-$decode" \
    --model resnet18 --stem imagenet --train-crop rrc --res 160 --eval-res 192 --batch-size 128 --epochs 2 \
    --num-workers 8 --decode $decode --wandb-mode disabled
  grep -hE "^epoch [0-9]+:|diagnosis|top-1 .* on " "$OUT/rrc-decode-$decode.log" | sed 's/^/  /' | tee -a "$OUT/summary.txt"
  [ "$DECODE" = cpu ] && break
done

# 3. the step benchmark
step bench-r18-32 200 $PY -m resnet_dist.bench step --json "$OUT/bench-r18-32.json" --step-batch 256 --batches 10 --compile
step bench-r50-224 200 $PY -m resnet_dist.bench step --json "$OUT/bench-r50-224.json" --model resnet50 --stem imagenet \
  --step-size 224 --step-batch 128 --batches 10
for f in bench-r18-32 bench-r50-224; do grep -E "x$|x |ratio" "$OUT/$f.log" | head -12 | sed 's/^/  /' | tee -a "$OUT/summary.txt"; done

# 4. fp16 + SyncBN + a resume (CUDA only: fp16 has no autocast on a CPU)
FM=$WORK/fm
step pack-fm 120 $PY -m resnet_dist.shard fashion-mnist --root "$FMNIST" --out "$FM"
if [ "$GPU" = 1 ]; then
  for steps in 300 400; do
    step "fp16-syncbn-$steps" 200 $ACC --mixed_precision fp16 launch/train.py --data "$FM" --out "$WORK/fp16" \
      --recipe fashion-mnist-demo --batch-size 256 --num-workers 8 --sync-bn --max-steps $steps \
      --checkpoint-every 100 --wandb-mode disabled
  done
  grep -hiE "resumed|skipped_steps|diagnosis|test top-1" "$OUT"/fp16-syncbn-*.log | sed 's/^/  /' | tee -a "$OUT/summary.txt"
fi

# 5. the 15-minute recipe, clock from packing to summary (SKIP_RECIPE=1 leaves it out: 1.5 min on an H200)
[ "${SKIP_RECIPE:-0}" = 1 ] && { summary "recipe run skipped (SKIP_RECIPE=1)"; rm -rf "$WORK"; exit 0; }
step tta-fm-15min 240 $PY launch/time_to_accuracy.py --recipe fashion-mnist-15min --root "$FMNIST" \
  --out "$WORK/fm-15min" --goal 94.0 --budget 15 --launch "$ACC" --batch-size 256 --num-workers 8 --wandb-mode disabled
cp "$WORK/fm-15min/result.json" "$OUT/result-fm-15min.json" 2>/dev/null
grep -hE "test top-1|diagnosis" "$OUT/tta-fm-15min.log" | tail -3 | sed 's/^/  /' | tee -a "$OUT/summary.txt"
rm -rf "$WORK"
