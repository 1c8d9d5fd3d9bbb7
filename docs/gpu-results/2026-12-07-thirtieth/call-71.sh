#!/usr/bin/env bash
# Device call 71 (thirtieth session; carry .gpu71, `WHICH=71 bash scripts/gpu-pending/prepare.sh`;
# any card, ~520 s): decode.gpu_priority = "auto" (the decode node's streams ranked high only
# for steps of at least 32 sequences) against "high" and "normal", for issue 16's one-GPU
# targets, which call 69 met only one at a time (high: saturation; normal: 1 req/s).
#   tests      the engine's CUDA stream-rank tests (an auto GPU's streams follow the step)
#   mps-auto   the two-process pair under MPS ranked auto, then the colocated node; 32 x
#              4096/128 at 1 req/s and the saturation run (768 x 512/256, 256 at a time)
#   mps-high, mps-normal   the pair alone, ranked high, then normal
#   one-auto   if time is left: one `tandem up` process (no MPS) ranked auto
# The decode node logs each change of rank (debug); the summary counts them.
# C71: the carried folder (.gpu71; call 72 passes .gpu72, built from 2efd84e).
set -u
DEADLINE_S=${DEADLINE_S:-580}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c71
C71=${C71:-.gpu71}
G=/tmp/g71; mkdir -p "$G" && cp -r "$C71/gpu-1p1d" "$G/"
unxz_to "$G" "$C71/tandem.xz" "$C71/engine-tests.xz"
env_line
step tests 60 "" "$G/engine-tests" --ignored cuda::device --test-threads 1
tail -3 "$O/tests.md"
smi_start
run() { # LABEL PRIORITY LIMIT ENV..: one gpu_ttft.sh run under MPS
  local label=$1 p=$2 limit=$3; shift 3
  [ $(( $(date +%s) - t0 + 40 )) -lt "$DEADLINE_S" ] || { echo "$label: skipped (time)"; return; }
  [ $(( $(date +%s) - t0 + limit )) -lt "$DEADLINE_S" ] || limit=$(( DEADLINE_S - ($(date +%s) - t0) ))
  env RUST_LOG=info,tandem_engine::cuda::device=debug MPS=1 DECODE_PRIORITY=$p OUT=/tmp/c71/$label \
    GPU_DIR=$G SKIP512=1 SAT=1 RATES=1 N=32 "$@" timeout -s KILL "$limit" bash scripts/gpu_ttft.sh \
    > /dev/null 2>&1
  echo "$label rc=$? at $(( $(date +%s) - t0 )) s"
  pkill -9 -f "$G/tandem"
  echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
  sleep 1
}
run mps-auto auto 260
run mps-high high 140 NOCOLO=1
run mps-normal normal 140 NOCOLO=1
run one-auto auto 140 MPS= NOPAIR=1 NOCOLO=1 UP=1
smi_stop
pkill -9 -f "$G/tandem"
# Few files come back: the summaries only.
for r in mps-auto mps-high mps-normal one-auto; do
  d=/tmp/c71/$r
  [ -f "$d/ttft.md" ] || continue
  { echo "## $r"
    grep -E "^### |^MPS|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" "$d/ttft.md"
    sed -n '/alone vs/,$p' "$d/ttft.md"
    mkdir -p "$d/x" && tar -xzf "$d/logs.tgz" -C "$d/x" 2>/dev/null
    for l in "$d"/x/decode-*.log "$d"/x/up.log; do
      [ -f "$l" ] || continue
      ranked=$(sed 's/\x1b\[[0-9;]*m//g' "$l" | grep 'CUDA streams ranked')
      echo "$(basename "$l"): $(printf '%s' "$ranked" | grep -c .) rank changes:" \
        "$(printf '%s' "$ranked" | grep -o 'rank=-\?[0-9]*' | sort | uniq -c | tr '\n' ' ')"
    done; } | tee "$O/$r.md"
done
