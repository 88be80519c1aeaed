#!/usr/bin/env bash
# Kept as run on 2026-12-06 (its paths are that session's); docs/performance.md reads its output.
# The restart with passive waiting, measured: `full` on the proxy preset, ITERS iterations, a competing 2-thread
# job started 2 s after the run (the run's CLI found the machine idle). Wall time of the whole command (restart
# included) and the competitor's rate, against the same with OMP_WAIT_POLICY=PASSIVE from the start.
set -uo pipefail
CODE=${CODE:-/work/main}
cd "$CODE"  # a checkout of the code to measure
PY=/work/main/.venv/bin/python
ITERS=${ITERS:-60}
OUT=${OUT:-/work/rounds/omp/out2}
mkdir -p "$OUT"
compete() {
  "$PY" - "$1" "$OUT/competitor-$2.txt" <<'PY' &
import signal, sys, time, torch
torch.set_num_threads(2)
n = 768 if sys.argv[1] == "big" else 256
a, w = torch.randn(n, n), torch.randn(n, n) / n ** 0.5
count, start = 0, time.perf_counter()
def stop(*_):
    open(sys.argv[2], "w").write(f"{count / (time.perf_counter() - start):.1f}\n"); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    a = (a @ w).clamp_(-1, 1); count += 1
PY
  COMPETITOR=$!
}
measure() {  # label, competitor kind or none, then env assignments
  local label=$1 kind=$2; shift 2
  local dir="$OUT/$label"
  rm -rf "$dir"
  local t0=$(date +%s.%N)
  env "$@" "$PY" -m benchmarks run --methods full --results-dir "$dir" --no-progress \
      --set train.iters="$ITERS" --set data.eval_limit=1 --set data.source_holdout=1 >"$dir.log" 2>&1 &
  local run=$!
  if [ "$kind" != none ]; then sleep 2; compete "$kind" "$label"; fi
  wait $run
  local rc=$?
  local t1=$(date +%s.%N)
  if [ "$kind" != none ]; then kill -TERM $COMPETITOR; wait $COMPETITOR 2>/dev/null; fi
  "$PY" - "$dir" "$label" "$t0" "$t1" "$OUT/competitor-$label.txt" "$rc" "$dir.log" <<'PY'
import json, pathlib, sys
result = json.loads(next(pathlib.Path(sys.argv[1]).rglob("*.json")).read_text())
comp = pathlib.Path(sys.argv[5])
rate = comp.read_text().strip() if comp.exists() else "-"
restarted = "restarted at iteration %s" % result.get("resumed_from_iter") if result.get("resumed_from_iter") else "not restarted"
print(f"{sys.argv[2]:>16}: wall {float(sys.argv[4]) - float(sys.argv[3]):6.1f} s | rc {sys.argv[6]} | {restarted} | competitor {rate} it/s | miou {result['average_miou']:.4f} | {result['environment']['cpu_plan'].split('OpenMP waits: ')[1]}", flush=True)
PY
}
echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) code $(git -C "$CODE" rev-parse --short HEAD) iters $ITERS"
for round in $(seq "${ROUNDS:-1}"); do
  measure "r$round-auto-none" none X=1
  measure "r$round-auto-big" big X=1
  measure "r$round-passive-big" big OMP_WAIT_POLICY=PASSIVE
  measure "r$round-auto-small" small X=1
  measure "r$round-passive-small" small OMP_WAIT_POLICY=PASSIVE
done
echo "end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
