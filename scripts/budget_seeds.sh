#!/usr/bin/env bash
# The Part 2 budget recipe's confirmation runs on a 2-core CPU, one after another: fresh seeds
# S+1 and S+2 side by side (one thread each: throughput, not timing), seed S alone natively
# (its wall time is the native time), then seed S+3 alone under the AVX2 cap (fp32: the laptop
# time). Each run's wall time goes to OUT/timings.txt. S: FIRST_SEED (default 100).
# Usage: bash scripts/budget_seeds.sh "RECIPE FLAGS" [FACADE_DIR] [OUT_DIR] [FIRST_SEED]
set -u
RECIPE=$1
DATA=${2:-data/facade}
OUT=${3:-runs/budget}
S=${4:-100}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
source "$(dirname "$0")/timed_run.sh"  # run NAME [VAR=VALUE...] COMMAND...
run seed$((S + 1)) $PY part2_segment.py --data "$DATA" $RECIPE --seed $((S + 1)) --threads 1 &
run seed$((S + 2)) $PY part2_segment.py --data "$DATA" $RECIPE --seed $((S + 2)) --threads 1 &
wait
run seed$S $PY part2_segment.py --data "$DATA" $RECIPE --seed $S
run avx2_seed$((S + 3)) ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 \
    $PY part2_segment.py --data "$DATA" $RECIPE --seed $((S + 3))
echo done >> "$OUT/timings.txt"
