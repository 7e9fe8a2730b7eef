# Sourced by the CPU confirmation scripts (budget_seeds.sh, fresh_seeds.sh); needs OUT set.
# run NAME [VAR=VALUE...] COMMAND...: runs COMMAND --output-dir OUT/NAME --no-progress with its
# output in OUT/NAME.out, and appends its exit status and wall time to OUT/timings.txt.
run() {
  local name=$1; shift
  local start=$(date +%s)
  env "$@" --output-dir "$OUT/$name" --no-progress > "$OUT/$name.out" 2>&1
  echo "$name rc=$? wall_s=$(( $(date +%s) - start )) $*" >> "$OUT/timings.txt"
}
