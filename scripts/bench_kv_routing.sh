#!/usr/bin/env bash
# The prefix-cache and KV-aware-routing comparison of docs/PREFIX_CACHE.md,
# in one run: (a) 1 prefill + 1 decode node, cache on vs off; (b) 2 decode
# nodes (local prefill), routing kv_aware vs round_robin vs least_loaded.
# Every cluster starts fresh (empty caches). Usage:
#   scripts/bench_kv_routing.sh [TANDEM_BINARY] [extra bench flags...]
set -euo pipefail
BIN=${1:-target/release/tandem}; shift || true
MODEL=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT=${OUT:-bench-kv-routing}
WORKLOAD=(--dataset multi-turn --sessions "${SESSIONS:-8}" --turns "${TURNS:-4}"
  --system-prompt-len "${SYSTEM_LEN:-256}" --turn-len "${TURN_LEN:-64}"
  --output-len "${OUTPUT_LEN:-16}" --think-time-ms 100 --request-rate "${RATE:-1}"
  --no-progress "$@")
mkdir -p "$OUT"
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done; PIDS=(); }
trap stop_all EXIT

decode() { # id grpc quic metrics cache
  cat > "$OUT/$1.toml" <<T
[model]
path = "$MODEL"
[decode]
id = "$1"
listen = "127.0.0.1:$2"
quic_listen = "127.0.0.1:$3"
kv_blocks = 4096
local_prefill_below = ${LOCAL_BELOW:-32}
prefix_cache = $5
[metrics]
listen = "127.0.0.1:$4"
T
  "$BIN" decode --config "$OUT/$1.toml" >"$OUT/$1.log" 2>&1 & PIDS+=($!)
}
prefill() { # cache
  cat > "$OUT/prefill.toml" <<T
[model]
path = "$MODEL"
[prefill]
listen = "127.0.0.1:50071"
prefix_cache = $1
[metrics]
listen = "127.0.0.1:9191"
T
  "$BIN" prefill --config "$OUT/prefill.toml" >"$OUT/prefill.log" 2>&1 & PIDS+=($!)
}
router() { # prefill_nodes decode_nodes routing
  cat > "$OUT/router.toml" <<T
[model]
path = "$MODEL"
[router]
listen = "127.0.0.1:50051"
prefill_nodes = [$1]
decode_nodes = [$2]
routing = "$3"
# Measures the caches, not admission: no refusals for the prefill backlog
# (on a slow CPU a few sessions' first turns would be refused).
max_prefill_backlog_s = 0
[metrics]
listen = "127.0.0.1:9190"
T
  "$BIN" router --config "$OUT/router.toml" >"$OUT/router.log" 2>&1 & PIDS+=($!)
}
ready() { # log files: wait until each node says it listens
  for f in "$@"; do
    for _ in $(seq 600); do grep -q "node listening on\|router listening" "$f" && break; sleep 0.1; done
  done
}
bench() { # name metrics-urls
  ready "$OUT"/*.log
  sleep 1
  echo "=== $1"
  "$BIN" bench "${WORKLOAD[@]}" --metrics-url "$2" --result-file "$OUT/$1.json" | tee "$OUT/$1.txt"
}

for cache in true false; do
  rm -f "$OUT"/*.log
  decode decode-0 50061 50062 9192 "$cache"; prefill "$cache"
  # Nodes first: a router watching a node that is not up yet opens its breaker.
  ready "$OUT"/*.log
  router '"http://127.0.0.1:50071"' '"http://127.0.0.1:50061"' kv_aware
  bench "cache-$cache" http://127.0.0.1:9191/metrics,http://127.0.0.1:9192/metrics
  stop_all
done
for routing in kv_aware round_robin least_loaded; do
  rm -f "$OUT"/*.log
  decode decode-0 50061 50062 9192 true; decode decode-1 50081 50082 9193 true
  ready "$OUT"/*.log
  router '' '"http://127.0.0.1:50061", "http://127.0.0.1:50081"' "$routing"
  bench "2decode-$routing" http://127.0.0.1:9192/metrics,http://127.0.0.1:9193/metrics
  stop_all
done
