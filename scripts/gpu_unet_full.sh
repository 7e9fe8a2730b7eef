#!/usr/bin/env bash
# One GPU call: the fp16 path's train-stop-resume on CUDA (tiny ranges, seconds), then the full
# U-Net recipe on three fresh seeds, one job at a time so each epoch time is the GPU's alone,
# each best checkpoint tested again with --tta. A seed starts only if the deadline leaves it
# the time a full run took on an H100 (~170 s with start-up and test); none is cut short.
# Checkpoints stay behind; the run folders come back packed in OUT/runs.tar.gz.
# Usage: bash scripts/gpu_unet_full.sh OUT_DIR DEADLINE_S FACADE_DIR [SEED ...]
set -u
OUT=${1:?OUT_DIR}
DEADLINE=${2:?DEADLINE_S}
FACADE=${3:?FACADE_DIR}
shift 3
SEEDS=${*:-100 101 102}
PY=${PYTHON:-python3}
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
mkdir -p "$OUT/runs" "$OUT/logs"
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  nproc; } > "$OUT/gpu.txt" 2>&1
P2="part2_segment.py --data $FACADE --no-progress"
log() { echo "$(( $(date +%s) - start ))s $*" | tee -a "$OUT/logs/done.txt"; }

# fp16 with a gradient scaler: one epoch, stopped, resumed to the second, on CUDA.
SMOKE="$P2 --amp-dtype fp16 --epochs 2 --train-range 0 49 --val-range 800 809 --test-range 0 9"
$PY $SMOKE --stop-after-epochs 1 --output-dir "$OUT/runs/fp16_resume" \
  > "$OUT/logs/fp16_first.log" 2>&1
log "fp16 first half rc=$?"
$PY $P2 --resume "$OUT/runs/fp16_resume/checkpoints/last.pt" > "$OUT/logs/fp16_resume.log" 2>&1
log "fp16 resume rc=$?"

for seed in $SEEDS; do
  if [ "$(left)" -lt 175 ]; then log "seed $seed not started: $(left) s left"; continue; fi
  run="$OUT/runs/p2_unet_s$seed"
  # --time-limit is a guard only: a full run here should take well under it.
  $PY $P2 --model unet --seed "$seed" --time-limit 4 --output-dir "$run" \
    > "$OUT/logs/p2_unet_s$seed.log" 2>&1
  log "p2_unet_s$seed rc=$?"
  $PY part2_segment.py --eval-only "$run/checkpoints/best.pt" --data "$FACADE" --tta \
    --no-progress > "$OUT/logs/p2_unet_s$seed.tta.log" 2>&1
  log "p2_unet_s$seed tta rc=$?"
done
tar -czf "$OUT/runs.tar.gz" -C "$OUT" --exclude='*.pt' --exclude='report.html' runs logs gpu.txt
log "packed"
