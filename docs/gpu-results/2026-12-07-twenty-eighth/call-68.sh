#!/usr/bin/env bash
# Device call 68 (twenty-eighth session, on call 67's warm H100; carry .gpu67): the
# two-process pair under MPS with the decode process's streams at the default priority
# (TANDEM_CUDA_STREAM_PRIORITY=0), then ranked above (the default), side by side: 32 x
# 4096/128 at 1 req/s and the saturation run each. Only the summaries come back.
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c68
G=/tmp/g67; [ -x "$G/tandem" ] || { mkdir -p "$G" && cp -r .gpu67/gpu-1p1d "$G/" && unxz_to "$G" .gpu67/tandem.xz; }
for v in off on; do
  pri=1; [ "$v" = off ] && pri=0
  TANDEM_CUDA_STREAM_PRIORITY=$pri RUST_LOG=warn MPS=1 OUT=/tmp/c68-$v GPU_DIR=$G NOCOLO=1 SKIP512=1 SAT=1 RATES=1 N=32 \
    timeout -s KILL 140 bash scripts/gpu_ttft.sh > /dev/null 2>&1
  echo "$v rc=$? at $(( $(date +%s) - t0 )) s"
  pkill -9 -f "$G/tandem"; echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
  grep -E "^### |Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" /tmp/c68-$v/ttft.md | tee "$O/$v.md"
done
