#!/usr/bin/env bash
# The GPU result runs quoted in the README, in one go (they took about 7 minutes on one H100):
# the benchmark (fp32 / bf16 / fp16), the reference segmenter and the U-Net, each a full run folder.
# Usage: bash scripts/gpu_runs.sh [FACADE_DIR] [OUT_DIR]
set -u
DATA=${1:-data/facade}
OUT=${2:-outputs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# 1. fp16 + GradScaler path, eval-only and predict on CUDA (smoke checks, a few seconds).
timeout 60 $PY part2_segment.py --data "$DATA" --amp --amp-dtype fp16 --epochs 1 --train-range 0 49 --val-range 800 809 \
    --test-range 0 9 --no-progress --output-dir "$OUT/smoke_fp16" 2>&1 | tail -3 | tee "$OUT/smoke.log"

# 2. Reference FCN, the reference recipe, bf16 autocast.
timeout 170 $PY part2_segment.py --data "$DATA" --epochs 40 --amp --channels-last --time-limit 2 --no-progress \
    --output-dir "$OUT/p2_reference" 2>&1 | tee "$OUT/p2_reference.log" | grep -v "^epoch"
timeout 60 $PY part2_segment.py --eval-only "$OUT/p2_reference/checkpoints/best.pt" --data "$DATA" --no-progress \
    --output-dir "$OUT/p2_reference_evalonly" 2>&1 | grep "Mean AP" | tee -a "$OUT/smoke.log"
timeout 60 $PY part2_segment.py predict --checkpoint "$OUT/p2_reference/checkpoints/best.pt" \
    "$DATA/test_dev/eecs442_0110.jpg" --output-dir "$OUT/predict" 2>&1 | tee -a "$OUT/smoke.log"

# 3. Improved U-Net (default recipe: 150 epochs, scale-crop/flip/jitter, weighted CE + Dice, cosine).
timeout 260 $PY part2_segment.py --data "$DATA" --model unet --amp --channels-last --time-limit 3.5 --no-progress \
    --output-dir "$OUT/p2_unet" 2>&1 | tee "$OUT/p2_unet.log" | grep -v "^epoch"

# 5. Throughput, naive vs ours (Part 1 on random data of the real shape: the dataset does not travel).
timeout 150 $PY benchmark.py --synthetic 1 --facade-root "$DATA" --output "$OUT/benchmark_cuda.json" 2>&1 | tee "$OUT/benchmark.log"
