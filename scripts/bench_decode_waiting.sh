#!/usr/bin/env bash
# router.decode_waiting side by side on the CPU (SmolLM2, `tandem up`): a decode
# node with a small batch (max_batch 4) saturated by 16 concurrent requests of
# 128 prompt tokens (prefilled on the prefill node) and 32 output tokens, with
# the router's bound at 2 waiting requests per decode node ("bounded"), the
# same with the decode node sending a first token on arrival even when the
# batch has no place for its sequence ("bounded-early": decode.hold_first_token
# = false), and without the bound ("unbounded", "unbounded-early"); "bounded8" etc.
# set another bound (8 waiting places); ROUNDS rounds, the set-ups
# taking turns. Writes each run's report and a summary under $OUT.
#
# Usage: OUT=dir [ROUNDS=2] [NUM=48] [VARIANTS="bounded bounded-early unbounded"]
#        scripts/bench_decode_waiting.sh path/to/tandem
set -u
BIN=$(realpath "${1:?path to a release tandem binary}")
OUT=$(realpath -m "${OUT:-./decode-waiting-out}")
ROUNDS=${ROUNDS:-2}
NUM=${NUM:-48}
VARIANTS=${VARIANTS:-bounded bounded-early unbounded}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for w in $VARIANTS; do
  sed -e 's/^max_batch = .*/max_batch = 4/' cluster-configs/local.toml > "$OUT/$w.toml"
  # bounded[N][-early] | unbounded[-early]: N waiting places (2 by default).
  case ${w%-early} in
    unbounded) ;;
    bounded*) n=${w%-early}; n=${n#bounded}
      sed -i -e "/^decode_waiting *=/d" -e "/^max_queue = /a decode_waiting = ${n:-2}" "$OUT/$w.toml" ;;
    *) echo "unknown variant $w" >&2; exit 2 ;;
  esac
  case $w in
    *-early) sed -i -e '/^hold_first_token *=/d' -e '/^local_prefill_below = /a hold_first_token = false' "$OUT/$w.toml" ;;
  esac
done
for r in $(seq 1 "$ROUNDS"); do
  for w in $VARIANTS; do
    "$BIN" up --config "$OUT/$w.toml" > "$OUT/up-$w-$r.log" 2>&1 & PID=$!
    until grep -q "Tandem is up" "$OUT/up-$w-$r.log" 2>/dev/null; do sleep 0.2; done
    "$BIN" bench --num-prompts "$NUM" --input-len 128 --output-len 32 --max-concurrency 16 \
      --no-progress > "$OUT/bench-$w-$r.txt" 2>&1
    kill "$PID"; wait "$PID" 2>/dev/null
    echo "round $r $w: $(grep -E 'Median TTFT|P99 TTFT|Median TPOT|P99 ITL|Median E2EL|Output token throughput' "$OUT/bench-$w-$r.txt" | tr -s ' ' | paste -sd ';')" | tee -a "$OUT/summary.txt"
  done
done
