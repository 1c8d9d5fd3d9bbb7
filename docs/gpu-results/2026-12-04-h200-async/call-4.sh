#!/usr/bin/env bash
# Device call 4 (issue 16, saturation): router.decode_waiting on the H200. The
# 768 x 512/256 saturation run (256 concurrent) of the disaggregated and the
# colocated set-ups as before, then of the disaggregated set-up with
# router.decode_waiting = 8 (the decode node holds max_batch 128 + 8 requests,
# the rest wait at the router). Carry .gpu7 (binaries of main).
set -u
G=${GPU_DIR:-.gpu7}; O=${OUT:-/tmp/out}/h; mkdir -p "$O"
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
OUT=$O/base GPU_DIR=$G SAT=1 SKIP512=1 RATES=1 N=8 \
  timeout -s KILL 280 bash scripts/gpu_ttft.sh > "$O/base.out" 2>&1; el base $?
pkill -9 -f "$G/tandem"; sleep 1
OUT=$O/bounded GPU_DIR=$G SAT=1 SKIP512=1 NOCOLO=1 RATES=1 N=8 DECODE_WAITING=8 \
  timeout -s KILL 240 bash scripts/gpu_ttft.sh > "$O/bounded.out" 2>&1; el bounded $?
pkill -9 -f "$G/tandem"; sleep 1
cp "$O/base/ttft.md" "$O/ttft-base.md" 2>/dev/null; cp "$O/bounded/ttft.md" "$O/ttft-bounded.md" 2>/dev/null
tar -czf "$O/logs.tgz" -C "$O" base bounded && rm -rf "$O/base" "$O/bounded"
ls -la "$O"
