#!/usr/bin/env bash
# Device call 67 (twenty-eighth session; carry .gpu67, `WHICH=67 bash
# scripts/gpu-pending/prepare.sh`; ~520 s, any card): the decode node's CUDA streams at
# the greatest stream priority (7c2deb7), issue 16's one-GPU benchmark: the 8B shape
# (synthesized, bf16), the gpu-1p1d configs with both nodes on GPU 0, 32 x 4096/128 at
# 1 req/s and the saturation run (768 x 512/256, 256 at a time) for
#   one/: colocated; one `tandem up` process (decode streams ranked above the prefill
#         node's); the same process with TANDEM_CUDA_STREAM_PRIORITY=0 (up2: equal ranks)
#   mps/: the two-process pair under the MPS daemon (decode process's streams ranked
#         above; whether MPS honours one client's priorities against another's)
# First the GPU test that a High backend's streams get the greatest priority.
set -u
DEADLINE_S=${DEADLINE_S:-580}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c67
G=/tmp/g67; mkdir -p "$G" && cp -r .gpu67/gpu-1p1d "$G/"
unxz_to "$G" .gpu67/tandem.xz .gpu67/engine-tests.xz
env_line
step ranks 60 "" "$G/engine-tests" --ignored --exact \
  cuda::device::tests::a_high_priority_gpu_ranks_its_streams_above_a_normal_one
tail -3 "$O/ranks.md"
smi_start
RUST_LOG=info OUT=$O/one GPU_DIR=$G NOPAIR=1 UP=1 UP2_ENV=TANDEM_CUDA_STREAM_PRIORITY=0 SAT=1 \
  RATES=1 N=32 timeout -s KILL 350 bash scripts/gpu_ttft.sh > "$O/one.out" 2>&1
echo "one rc=$? at $(( $(date +%s) - t0 )) s"
pkill -9 -f "$G/tandem"; sleep 1
left=$(( 575 - ($(date +%s) - t0) ))
RUST_LOG=info MPS=1 OUT=$O/mps GPU_DIR=$G NOCOLO=1 SKIP512=1 SAT=1 RATES=1 N=32 \
  timeout -s KILL "$left" bash scripts/gpu_ttft.sh > "$O/mps.out" 2>&1
echo "mps rc=$? at $(( $(date +%s) - t0 )) s"
smi_stop
pkill -9 -f "$G/tandem"; echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null
for r in one mps; do
  echo "## $r"
  grep -E "^### |^MPS|^synth|Successful|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" "$O/$r/ttft.md"
done
