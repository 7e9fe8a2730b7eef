#!/usr/bin/env bash
# Fresh seeds for a CPU headline that was settled while test numbers were in view, on a 2-core
# CPU: seed 100 alone (its wall time is the documented time), then seeds 101 and 102 side by
# side at one thread each (throughput, not timing; for fashion_net the pair ran at 1.07x the
# throughput of one run alone). Each run's wall time goes to OUT/timings.txt.
# Usage: bash scripts/fresh_seeds.sh fashion_net|unet_cpu [OUT_DIR]
#   fashion_net: python part1_classify.py --model fashion_net --tta (data/fashion-mnist)
#   unet_cpu:    the Part 2 CPU recipe (data/facade)
set -u
RECIPE=${1:?fashion_net or unet_cpu}
OUT=${2:-runs/fresh}
PY=${PYTHON:-.venv/bin/python}
case $RECIPE in
  fashion_net) CMD="$PY part1_classify.py --data-root data/fashion-mnist --model fashion_net
    --tta" ;;
  unet_cpu) CMD="$PY part2_segment.py --data data/facade --model unet --width 16 --crop 128
    --crop-scale 0.45 0.6 --epochs 150 --tta" ;;
  *) echo "unknown recipe: $RECIPE (fashion_net or unet_cpu)" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
source "$(dirname "$0")/timed_run.sh"  # run NAME [VAR=VALUE...] COMMAND...
run "${RECIPE}_seed100" $CMD --seed 100
run "${RECIPE}_seed101" $CMD --seed 101 --threads 1 &
run "${RECIPE}_seed102" $CMD --seed 102 --threads 1 &
wait
