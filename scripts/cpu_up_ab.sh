#!/usr/bin/env bash
# CPU A/B of two `tandem` builds end to end: `tandem up` (embedded default
# config, SmolLM2; 256-token prompts are prefilled on the prefill node and their
# KV crosses QUIC), 32 requests of 256 prompt / 32 output tokens at 2 req/s,
# the two binaries taking turns, ROUNDS rounds (2). Run from a directory with a
# models/ link to the repo's models/. Writes $OUT/bench.md and the nodes' logs.
# Usage: scripts/cpu_up_ab.sh BEFORE_BINARY AFTER_BINARY
set -u
BEFORE=$1 AFTER=$2
OUT=${OUT:-./up-ab}; mkdir -p "$OUT"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for v in before after; do
    if [ "$v" = before ]; then T=$BEFORE; else T=$AFTER; fi
    $T up > "$OUT/up-$v-$round.log" 2>&1 & PID=$!
    for _ in $(seq 1 60); do $T bench --router http://127.0.0.1:50051 --num-prompts 1 --input-len 256 --output-len 2 --no-progress >/dev/null 2>&1 && break; sleep 1; done
    echo "### $v, round $round" >> "$OUT/bench.md"
    $T bench --router http://127.0.0.1:50051 --num-prompts 32 --input-len 256 --output-len 32 --request-rate 2 --seed 1 --no-progress 2>&1 | tee -a "$OUT/bench.md" | grep -E "Median TTFT|Median TPOT|P99 ITL|Output token throughput|first_token \(|prefill_compute|Successful"
    kill $PID; wait $PID 2>/dev/null
  done
done
