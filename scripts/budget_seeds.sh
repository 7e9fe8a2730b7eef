#!/usr/bin/env bash
# The Part 2 budget recipe's confirmation runs on a 2-core CPU, one after another: fresh seeds
# 101 and 102 side by side (one thread each: throughput, not timing), seed 100 alone natively
# (its wall time is the native time), then seed 103 alone under the AVX2 cap (fp32: the laptop
# time). Each run's wall time goes to OUT/timings.txt.
# Usage: bash scripts/budget_seeds.sh "RECIPE FLAGS" [FACADE_DIR] [OUT_DIR]
set -u
RECIPE=$1
DATA=${2:-data/facade}
OUT=${3:-runs/budget}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
source "$(dirname "$0")/timed_run.sh"  # run NAME [VAR=VALUE...] COMMAND...
run seed101 $PY part2_segment.py --data "$DATA" $RECIPE --seed 101 --threads 1 &
run seed102 $PY part2_segment.py --data "$DATA" $RECIPE --seed 102 --threads 1 &
wait
run seed100 $PY part2_segment.py --data "$DATA" $RECIPE --seed 100
run avx2_seed103 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
    $PY part2_segment.py --data "$DATA" $RECIPE --seed 103
echo done >> "$OUT/timings.txt"
