#!/usr/bin/env bash
# Device call (next session): do two processes sharing one GPU under MPS close
# round 7's two-process gap? 16 x 4k/128 at 1 req/s, binary b (4988d35) of
# docs/gpu-results/2026-12-05-h200-first-token/ (carry .gpu9): disaggregated in
# two processes without MPS, then with MPS=1 (disaggregated and colocated).
set -u
O=${OUT:-/tmp/out}/m; mkdir -p "$O"
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
mkdir -p /tmp/gpu9/b && cp -r .gpu9/b/gpu-1p1d /tmp/gpu9/b/
python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
  .gpu9/b/tandem.xz /tmp/gpu9/b/tandem && chmod +x /tmp/gpu9/b/tandem
summary() { grep -E "^### |^MPS|Median TTFT|P99 TTFT|prefill_compute|first_token \(|Median TPOT|P99 ITL" "$1"; }
RUST_LOG=info OUT=$O/plain GPU_DIR=/tmp/gpu9/b SKIP512=1 NOCOLO=1 RATES=1 N=16 \
  timeout -s KILL 120 bash scripts/gpu_ttft.sh > "$O/plain.out" 2>&1; el plain $?
pkill -9 -f /tmp/gpu9/b/tandem; sleep 1
RUST_LOG=info MPS=1 OUT=$O/mps GPU_DIR=/tmp/gpu9/b SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 200 bash scripts/gpu_ttft.sh > "$O/mps.out" 2>&1; el mps $?
pkill -9 -f /tmp/gpu9/b/tandem; echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
for v in plain mps; do echo "== $v"; summary "$O/$v/ttft.md"; sed -n '/alone vs/,$p' "$O/$v/ttft.md"; done
