#!/usr/bin/env bash
# Device call 58 (twenty-fifth session; carry .gpu58, built by `WHICH=58 bash
# scripts/gpu-pending/prepare.sh`): a decode node that takes KV blocks as sequences grow and
# preempts the newest when none is free (new/: f72def5's tandem) against one that takes
# prompt + max_tokens blocks at admission (old/: 6bd5912's), on issue 16's saturation run
# (768 requests of 512 prompt and 256 output tokens, 256 at a time, the 8B shape, the
# gpu-1p1d configs with both nodes on GPU 0, disaggregated) with the decode node's cache cut
# to BLOCKS blocks of 64 tokens (default 1024: 65k tokens, 85 requests at full length).
# The builds take turns (ORDER, default "old new"; a second call with ORDER="new old"); each run's decode log gives the
# preemptions ("preempted:" lines). DEADLINE_S (580): a run that might not end within it is
# skipped.
set -u
DEADLINE_S=${DEADLINE_S:-580}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c58
BLOCKS=${BLOCKS:-1024}
for b in old new next; do  # next/: b21fc0e (waiting in line at the router), where built
  [ -f .gpu58/$b/tandem.xz ] || continue
  mkdir -p /tmp/g58/$b && cp -r .gpu58/gpu-1p1d /tmp/g58/$b/
  unxz_to /tmp/g58/$b .gpu58/$b/tandem.xz
done
env_line
n=0
for b in ${ORDER:-old new}; do
  n=$((n + 1)); name=$n-$b-$BLOCKS
  [ $(( $(date +%s) - t0 + 220 )) -lt "$DEADLINE_S" ] || { echo "$name: skipped (time)"; continue; }
  WORK=/tmp/tandem-ttft OUT=$O/$name GPU_DIR=/tmp/g58/$b SAT=1 SKIP512=1 NOCOLO=1 RATES= N=8 \
    DECODE_BLOCKS=$BLOCKS timeout -s KILL 220 bash scripts/gpu_ttft.sh > "$O/$name.out" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
  pkill -9 -f /tmp/g58/; sleep 1
  grep -E "Successful|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" "$O/$name/ttft.md"
  echo "preemptions: $(grep -c 'preempted:' "$O/$name/decode-disagg.log")"
  tar -C "$O" -czf "$OUT/c58.tgz" .
done
