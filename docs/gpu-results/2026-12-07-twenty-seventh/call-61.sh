#!/usr/bin/env bash
# Device call 61 (twenty-seventh session; carry .gpu61, `WHICH=61 bash
# scripts/gpu-pending/prepare.sh`; ~300 s, any card): issue 16's benchmark with main as it
# is now (2553a5e: KV blocks taken as sequences grow, the router's line for blocks, quinn's
# receive without a copy), disaggregated against colocated on one GPU: the 8B shape
# (synthesized, bf16), the gpu-1p1d configs with both nodes on GPU 0 under the CUDA MPS
# daemon (README: two processes on one GPU), `tandem bench` 4096/128 at 1 and 4 req/s (32
# requests each) and the saturation run (768 x 512/256, 256 at a time).
set -u
DEADLINE_S=${DEADLINE_S:-580}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c61
G=/tmp/g61; mkdir -p "$G" && cp -r .gpu61/gpu-1p1d "$G/"
unxz_to "$G" .gpu61/tandem.xz
env_line
smi_start
RUST_LOG=info MPS=1 OUT=$O/bench GPU_DIR=$G SKIP512=1 SAT=1 RATES="1 4" N=32 \
  timeout -s KILL 540 bash scripts/gpu_ttft.sh > "$O/bench.out" 2>&1
echo "bench rc=$? at $(( $(date +%s) - t0 )) s"
smi_stop
pkill -9 -f "$G/tandem"; echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
grep -E "^### |^MPS|^synth|Successful|Output token throughput|Median TTFT|Mean TTFT|P99 TTFT|Median TPOT|P99 ITL" "$O/bench/ttft.md"
sed -n '/alone vs/,$p' "$O/bench/ttft.md"
