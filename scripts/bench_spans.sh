#!/usr/bin/env bash
# The TTFT breakdown of docs/GPU_BENCH.md's "Where the TTFT goes" on the
# CPU, in one run: the same workload against fresh one-process clusters
# (`tandem up`), one after the other:
#   disagg       1 prefill + 1 decode node, the link's cost not weighed
#   colocated    the decode node prefills everything (local_prefill_below huge)
#   slow-off     disaggregated over a link capped at $SLOW_MBPS, cost not weighed
#   slow-on      the same capped link, link-cost prefill on (the default)
# `tandem bench` prints each run's TTFT and the median of every phase.
# Usage: scripts/bench_spans.sh [TANDEM_BINARY] [extra bench flags...]
set -euo pipefail
BIN=${1:-target/release/tandem}; shift || true
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-bench-spans}
SLOW_MBPS=${SLOW_MBPS:-10}
WORKLOAD=(--dataset synthetic --num-prompts "${PROMPTS:-10}" --input-len "${INPUT_LEN:-128}"
  --output-len "${OUTPUT_LEN:-8}" --request-rate "${RATE:-0.25}" --seed 1 --no-progress "$@")
mkdir -p "$OUT"
PID=
stop() { if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; fi; }
trap stop EXIT

run() { # name decode-extra prefill-extra
  cat > "$OUT/$1.toml" <<T
[model]
path = "$MODEL"
[router]
listen = "127.0.0.1:50061"
# Measures the TTFT, not admission: no refusals for the prefill backlog.
max_prefill_backlog_s = 0
[prefill]
chunk_tokens = 256
max_batch_tokens = 1024
prefix_cache = false
$3
[decode]
kv_blocks = 4096
prefix_cache = false
$2
T
  "$BIN" up --config "$OUT/$1.toml" >"$OUT/$1.log" 2>&1 & PID=$!
  for _ in $(seq 1 120); do
    (echo >/dev/tcp/127.0.0.1/50061) 2>/dev/null && break; sleep 0.5
  done
  sleep 2 # the nodes' first load reports reach the router
  # Two short prompts (prefilled on the decode node) teach it its prefill rate.
  "$BIN" bench --router http://127.0.0.1:50061 --num-prompts 2 --input-len 24 --output-len 2 \
    --no-progress >/dev/null 2>&1 || true
  echo "=== $1"
  "$BIN" bench --router http://127.0.0.1:50061 "${WORKLOAD[@]}" \
    --result-file "$OUT/$1.json" | sed -n '/Serving Benchmark Result/,$p' || echo "$1: bench failed"
  if grep -q "^Error" "$OUT/$1.log"; then grep -v "^  " "$OUT/$1.log" | head -5; fi
  stop
}

run disagg $'local_prefill_below = 32\nlink_cost_prefill = false' ""
run colocated "local_prefill_below = 1000000000" ""
run slow-off $'local_prefill_below = 32\nlink_cost_prefill = false' "max_send_rate_mbps = $SLOW_MBPS"
run slow-on "local_prefill_below = 32" "max_send_rate_mbps = $SLOW_MBPS"
for n in disagg colocated slow-off slow-on; do
  printf '%-10s prefill decisions: %s\n' "$n" \
    "$(grep -o 'reason="[a-z_]*"' "$OUT/$n.log" | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
done
