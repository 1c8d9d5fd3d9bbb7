#!/usr/bin/env bash
# Device call 65 (twenty-seventh session; same warm H100, carry .gpu61): call 61's
# disaggregated saturation run under uncapped MPS again (its P99 inter-token latency, 105 ms
# in call 61, checked).
source docs/gpu-results/2026-12-05-eighth/common.sh c65
RUST_LOG=info MPS=1 OUT=$O/mps100 GPU_DIR=/tmp/g61 SKIP512=1 NOCOLO=1 SAT=1 RATES="" N=32 \
  timeout -s KILL 200 bash scripts/gpu_ttft.sh > $O/mps100.out 2>&1
echo "rc=$?"
grep -E "^### |^MPS|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" $O/mps100/ttft.md
echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null; true
