#!/usr/bin/env bash
# router.decode_waiting side by side on the CPU (SmolLM2, `tandem up`): a decode
# node with a small batch (max_batch 4) saturated by 16 concurrent requests of
# 128 prompt tokens (prefilled on the prefill node) and 32 output tokens, with
# the router's bound at 2 waiting requests per decode node, then without it;
# ROUNDS rounds, the two taking turns. Writes each run's report and a summary
# under $OUT.
#
# Usage: OUT=dir [ROUNDS=2] [NUM=48] scripts/bench_decode_waiting.sh path/to/tandem
set -u
BIN=$(realpath "${1:?path to a release tandem binary}")
OUT=$(realpath -m "${OUT:-./decode-waiting-out}")
ROUNDS=${ROUNDS:-2}
NUM=${NUM:-48}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for w in bounded unbounded; do
  sed -e 's/^max_batch = .*/max_batch = 4/' -e 's/^\[metrics\]/[metrics]/' \
      cluster-configs/local.toml > "$OUT/$w.toml"
  if [ "$w" = bounded ]; then
    sed -i -e '/^max_queue = /a decode_waiting = 2' "$OUT/$w.toml"
  fi
done
for r in $(seq 1 "$ROUNDS"); do
  for w in bounded unbounded; do
    "$BIN" up --config "$OUT/$w.toml" > "$OUT/up-$w-$r.log" 2>&1 & PID=$!
    until grep -q "Tandem is up" "$OUT/up-$w-$r.log" 2>/dev/null; do sleep 0.2; done
    "$BIN" bench --num-prompts "$NUM" --input-len 128 --output-len 32 --max-concurrency 16 \
      --no-progress > "$OUT/bench-$w-$r.txt" 2>&1
    kill "$PID"; wait "$PID" 2>/dev/null
    echo "round $r $w: $(grep -E 'Median TTFT|P99 TTFT|Median TPOT|P99 ITL|Median E2EL|Output token throughput' "$OUT/bench-$w-$r.txt" | tr -s ' ' | paste -sd ';')" | tee -a "$OUT/summary.txt"
  done
done
