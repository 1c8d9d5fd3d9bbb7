#!/usr/bin/env bash
# Device call 66 (twenty-seventh session; carry .gpu61; ~130 s on a fresh machine, any card; ran on an H100):
# call 61's disaggregated set-up under MPS with the prefill process at MPS's below-normal
# client priority (CUDA_MPS_CLIENT_PRIORITY=1 in its environment alone; the decode process
# normal), so the decode steps' kernels go first and a prefill takes what they leave:
# 32 x 4096/128 at 1 req/s and the saturation run (compare calls 61, 63, 64).
set -u
DEADLINE_S=${DEADLINE_S:-580}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c66
G=/tmp/g61; [ -x $G/tandem ] || { mkdir -p $G && cp -r .gpu61/gpu-1p1d $G/ && unxz_to $G .gpu61/tandem.xz; }
W=/tmp/g66; mkdir -p $W && cp -r $G/gpu-1p1d $W/
printf '#!/bin/bash\nif [ "$1" = prefill ]; then export CUDA_MPS_CLIENT_PRIORITY=1; fi\nexec /tmp/g61/tandem "$@"\n' > $W/tandem
chmod +x $W/tandem
env_line
RUST_LOG=info MPS=1 OUT=$O/prio GPU_DIR=$W SKIP512=1 NOCOLO=1 SAT=1 RATES="1" N=32 \
  timeout -s KILL 240 bash scripts/gpu_ttft.sh > $O/prio.out 2>&1
echo "rc=$? at $(( $(date +%s) - t0 )) s"
grep -E "^### |^MPS|^synth|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" $O/prio/ttft.md
sed -n '/alone vs/,$p' $O/prio/ttft.md | tail -3
grep -h -i "priority\|error" $O/prio/*.log 2>/dev/null | head -5
echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null; true
