#!/usr/bin/env bash
# Device call (next session): binary c (c814acb: a received KV frame is kept as
# the packets' buffers and the CUDA import gathers them into the pinned ring;
# frames unchecked by default). First the 1p1d smoke (prefill and decode
# processes on the GPU, a long prompt's KV over QUIC, its greedy text against
# the CPU's: the gather's correctness on the device), then round 7's
# two-process TTFT without and with the CUDA MPS daemon (16 x 4k/128 at 1 req/s);
# the run without MPS ends with the same cluster as one `tandem up` process,
# whose two nodes now share one copy of the weights on the GPU (its log says
# "sharing the weights"). Carry .gpu9.
set -u
O=${OUT:-/tmp/out}/c; mkdir -p "$O"
export TANDEM_CUDA_KERNELS=$PWD/.gpu9/c/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
G=/tmp/gpu9/c; mkdir -p "$G" && cp -r .gpu9/c/gpu-1p1d "$G/"
python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
  .gpu9/c/tandem.xz "$G/tandem" && chmod +x "$G/tandem"
OUT=$O/smoke GPU_DIR=$G timeout -s KILL 120 bash scripts/gpu_1p1d_smoke.sh > "$O/smoke.out" 2>&1; el smoke $?
pkill -9 -f "$G/tandem"; sleep 1
summary() { grep -E "^### |^MPS|Median TTFT|P99 TTFT|prefill_compute|first_token \(|Median TPOT|P99 ITL" "$1"; }
RUST_LOG=info OUT=$O/plain GPU_DIR=$G SKIP512=1 NOCOLO=1 UP=1 RATES=1 N=16 \
  timeout -s KILL 180 bash scripts/gpu_ttft.sh > "$O/plain.out" 2>&1; el plain $?
tar -xzOf "$O/plain/logs.tgz" ./up.log 2>/dev/null | grep -m1 "sharing the weights"
pkill -9 -f "$G/tandem"; sleep 1
RUST_LOG=info MPS=1 OUT=$O/mps GPU_DIR=$G SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 200 bash scripts/gpu_ttft.sh > "$O/mps.out" 2>&1; el mps $?
pkill -9 -f "$G/tandem"; echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
cat "$O/smoke/1p1d.txt" | head -20
for v in plain mps; do echo "== $v"; summary "$O/$v/ttft.md"; sed -n '/alone vs/,$p' "$O/$v/ttft.md"; done
