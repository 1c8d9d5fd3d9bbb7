#!/usr/bin/env bash
# Device call 68 (written in the twenty-eighth session, not run yet; carry .gpu68,
# `WHICH=68 bash scripts/gpu-pending/prepare.sh`: ec50ce0's tandem, ~520 s, any card):
# decode.gpu_priority side by side in one call, which call 67 could not give for MPS
# (its MPS pair ran only ranked; call 61's unranked pair ran on another H100). The 8B
# shape, the gpu-1p1d configs with both nodes on GPU 0, 32 x 4096/128 at 1 req/s and
# the saturation run (768 x 512/256, 256 at a time) for
#   mps-normal/, mps-high/: the two-process pair under MPS, gpu_priority normal, then high
#   one/: colocated, then one `tandem up` process with gpu_priority high, then normal (up2)
# (A first try of this comparison, on call 67's warm machine, set RUST_LOG=warn: the
# script's wait for a remote prefill reads an info line, so both runs timed out.)
set -u
DEADLINE_S=${DEADLINE_S:-580}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c68
G=/tmp/g68; mkdir -p "$G" && cp -r .gpu68/gpu-1p1d "$G/"
unxz_to "$G" .gpu68/tandem.xz
env_line
smi_start
for p in normal high; do
  RUST_LOG=info MPS=1 DECODE_PRIORITY=$p OUT=/tmp/c68/mps-$p GPU_DIR=$G NOCOLO=1 SKIP512=1 SAT=1 \
    RATES=1 N=32 timeout -s KILL 150 bash scripts/gpu_ttft.sh > /dev/null 2>&1
  echo "mps-$p rc=$? at $(( $(date +%s) - t0 )) s"
  pkill -9 -f "$G/tandem"; echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
  sleep 1
done
left=$(( 575 - ($(date +%s) - t0) ))
RUST_LOG=info OUT=/tmp/c68/one GPU_DIR=$G NOPAIR=1 UP=1 DECODE_PRIORITY=high UP2_PRIORITY=normal SAT=1 \
  RATES=1 N=32 timeout -s KILL "$left" bash scripts/gpu_ttft.sh > /dev/null 2>&1
echo "one rc=$? at $(( $(date +%s) - t0 )) s"
smi_stop
pkill -9 -f "$G/tandem"
# Few files come back: the summaries only.
for r in mps-normal mps-high one; do
  { echo "## $r"
    grep -E "^### |^MPS|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" "/tmp/c68/$r/ttft.md"
    sed -n '/alone vs/,$p' "/tmp/c68/$r/ttft.md"; } | tee "$O/$r.md"
done
