#!/usr/bin/env bash
# Kept as run on 2026-12-06 (its paths are that session's); docs/performance.md reads its output.
# OpenMP waiting and a job that arrives after the run has chosen its policy (docs/performance.md).
# For each policy: `full` on the proxy preset alone, then with a competing 2-thread job started 2 s after the run
# (so the CLI, which reads the machine as it starts, found it idle and chose spinning unless told otherwise).
set -uo pipefail
cd /work/p28
PY=/work/main/.venv/bin/python
ITERS=${ITERS:-60}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-/work/rounds/omp/out}
mkdir -p "$OUT"
compete() {  # kind: big (768² matmuls) or small (256² matmuls, a barrier every few hundred µs of work)
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
  env "$@" "$PY" -m benchmarks run --methods full --results-dir "$dir" --no-progress \
      --set train.iters="$ITERS" --set data.eval_limit=1 --set data.source_holdout=1 >"$dir.log" 2>&1 &
  local run=$!
  if [ "$kind" != none ]; then sleep 2; compete "$kind" "$label"; fi
  wait $run
  if [ "$kind" != none ]; then kill -TERM $COMPETITOR; wait $COMPETITOR 2>/dev/null; fi
  "$PY" - "$dir" "$label" "$ITERS" "$OUT/competitor-$label.txt" <<'PY'
import json, pathlib, sys
result = json.loads(next(pathlib.Path(sys.argv[1]).rglob("*.json")).read_text())
comp = pathlib.Path(sys.argv[4])
rate = comp.read_text().strip() if comp.exists() else "-"
print(f"{sys.argv[2]:>24}: {result['timings']['train_s'] / int(sys.argv[3]):.3f} s/it | competitor {rate} it/s | {result['environment']['cpu_plan']}", flush=True)
PY
}
solo() {  # the competitor alone for 20 s, its rate
  compete "$1" "solo-$1"; sleep 20; kill -TERM $COMPETITOR; wait $COMPETITOR 2>/dev/null
  echo "$(printf '%24s' solo-$1): competitor $(cat $OUT/competitor-solo-$1.txt) it/s"
}
echo "start $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg) code $(git rev-parse --short HEAD) iters $ITERS"
[ -n "${NO_SOLO:-}" ] || { solo big; solo small; }
for round in $(seq "$ROUNDS"); do
  for policy in ${POLICIES:-default passive spin30k spin3k}; do
    case $policy in
      default) vars=(X=1);; passive) vars=(OMP_WAIT_POLICY=PASSIVE);;
      spin30k) vars=(GOMP_SPINCOUNT=30000);; spin3k) vars=(GOMP_SPINCOUNT=3000);;
    esac
    for kind in ${KINDS:-none big small}; do
      measure "r$round-$policy-$kind" "$kind" "${vars[@]}"
    done
  done
done
echo "end $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)"
