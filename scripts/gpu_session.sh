#!/usr/bin/env bash
# Seed runs and recipe candidates on one GPU, many at once (a small job does not fill a GPU).
# Each job is a full run folder; whatever has finished by the deadline is packed into
# OUT/runs.tar.gz (no checkpoints). Usage:
#   bash scripts/gpu_session.sh OUT_DIR DEADLINE_S PARALLEL FACADE_DIR FASHION_DIR [JOBSET]
# JOBSET: search (seeds and recipe candidates), defaults (reference models, fp32 against
# bf16 + channels-last, 3 seeds each), fp16 (the same models in fp16 with a gradient scaler,
# 3 seeds each) or seeds (the full U-Net recipe, then its best epoch tested again with --tta;
# the seeds defaults lacked; fashion_net). Without MPS, processes time-slice the GPU: more than
# a few at once slowed each job about 10x here (fashion_net: 17 epochs in 6 minutes).
# Timings of jobs that share the GPU are not throughput figures: use benchmark.py for those.
set -u
OUT=${1:-outputs/gpu}
DEADLINE=${2:-480}
PARALLEL=${3:-14}
FACADE=${4:-data/facade}
FASHION=${5:-data/fashion-mnist}
JOBSET=${6:-search}
PY=${PYTHON:-python3}
mkdir -p "$OUT/runs" "$OUT/logs"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/gpu.txt" 2>&1

P1="part1_classify.py --data-root $FASHION --no-download --no-progress --threads 1"
P2="part2_segment.py --data $FACADE --no-progress --threads 1"
FAST="--amp --channels-last"
defaults() {  # two lanes: the Part 2 runs, the Part 1 runs
  for s in 0 1 2; do echo "p2_fcn_fp32_s$s|$P2 --seed $s --time-limit 5"; done
  for s in 0 1 2; do echo "p1_sig_fp32_s$s|$P1 --seed $s --time-limit 5"; done
  for s in 0 1 2; do echo "p2_fcn_fast_s$s|$P2 $FAST --seed $s --time-limit 5"; done
  for s in 0 1 2; do echo "p1_sig_fast_s$s|$P1 $FAST --seed $s --time-limit 5"; done
}
seeds() {  # longest first; one lane for the rest while the three U-Nets run
  for s in 0 1 2; do echo "p2_unet_s$s|$P2 --model unet $FAST --seed $s --time-limit 7.5"; done
  echo "p2_fcn_fp32_s2|$P2 --seed 2 --time-limit 5"
  for s in 0 1 2; do echo "p2_fcn_fast_s$s|$P2 $FAST --seed $s --time-limit 5"; done
  echo "p1_sig_fp32_s2|$P1 --seed 2 --time-limit 3"
  for s in 0 1 2; do echo "p1_sig_fast_s$s|$P1 $FAST --seed $s --time-limit 3"; done
  for s in 0 1 2; do echo "p1_fnet_s$s|$P1 --model fashion_net $FAST --seed $s --time-limit 5"; done
}
fp16() {  # the reference models in fp16 with a gradient scaler, as GPUs without bf16 would run
  local fp16="--amp-dtype fp16 --channels-last"
  for s in 0 1 2; do echo "p2_fcn_fp16_s$s|$P2 $fp16 --seed $s --time-limit 3.5"; done
  for s in 0 1 2; do echo "p1_sig_fp16_s$s|$P1 $fp16 --seed $s --time-limit 3"; done
}
search() {  # name | command; longest first
  for s in 0 1 2; do echo "p2_unet_s$s|$P2 --model unet $FAST --seed $s --time-limit 6.5"; done
  for s in 0 1 2; do
    echo "p1_fnet_s$s|$P1 --model fashion_net $FAST --seed $s --time-limit 6"
    echo "p1_fnet_erase50_s$s|$P1 --model fashion_net $FAST --augment translate_flip_erase \
--epochs 50 --seed $s --time-limit 6"
    echo "p1_fnet_erase50_v10_s$s|$P1 --model fashion_net $FAST --augment translate_flip_erase \
--epochs 50 --val-fraction 0.1 --seed $s --time-limit 6"
  done
  local cpu="--model unet $FAST --crop 128 --time-limit 6"
  echo "p2_cpu_w32_e25|$P2 $cpu --width 32 --crop-scale 0.45 0.6 --epochs 25"
  echo "p2_cpu_w16_e60|$P2 $cpu --width 16 --crop-scale 0.45 0.6 --epochs 60"
  echo "p2_cpu_w16_e60_wide|$P2 $cpu --width 16 --crop-scale 0.4 0.8 --epochs 60"
  echo "p2_cpu_w24_e35|$P2 $cpu --width 24 --crop-scale 0.45 0.6 --epochs 35"
  for s in 0 1 2; do
    echo "p2_fcn_fp32_s$s|$P2 --seed $s --time-limit 5"
    echo "p2_fcn_fast_s$s|$P2 $FAST --seed $s --time-limit 5"
    echo "p1_sig_fp32_s$s|$P1 --seed $s --time-limit 5"
    echo "p1_sig_fast_s$s|$P1 $FAST --seed $s --time-limit 5"
  done
}
run_job() {
  local name=${1%%|*} cmd=${1#*|}
  local start=$(date +%s)
  $PY $cmd --output-dir "$OUT/runs/$name" > "$OUT/logs/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - start ))s" >> "$OUT/logs/done.txt"
  if [[ $name == p2_unet* && -f $OUT/runs/$name/results.json ]]; then
    $PY part2_segment.py --eval-only "$OUT/runs/$name/checkpoints/best.pt" --data "$FACADE" \
      --tta --amp --channels-last --no-progress > "$OUT/logs/$name.tta.log" 2>&1
    echo "$name tta rc=$? $(( $(date +%s) - start ))s" >> "$OUT/logs/done.txt"
  fi
}
export -f run_job
export OUT PY FACADE
start=$(date +%s)
$JOBSET | setsid xargs -d '\n' -P "$PARALLEL" -I{} bash -c 'run_job "$@"' _ {} &
pool=$!
while kill -0 $pool 2>/dev/null && [ $(( $(date +%s) - start )) -lt "$DEADLINE" ]; do sleep 5; done
kill -- -$pool 2>/dev/null; pkill -f -- "--output-dir $OUT/runs/" 2>/dev/null; sleep 2
echo "pool ended after $(( $(date +%s) - start )) s" >> "$OUT/logs/done.txt"
tar -czf "$OUT/runs.tar.gz" -C "$OUT" --exclude='*.pt' --exclude='report.html' \
  --exclude='figures/*_filters.png' --exclude='figures/*examples.png' runs logs gpu.txt
ls -la "$OUT"
