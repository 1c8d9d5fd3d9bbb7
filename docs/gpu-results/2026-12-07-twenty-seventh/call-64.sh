#!/usr/bin/env bash
# Device calls 64a-c (twenty-seventh session; after call-63 on the same warm H100, carry
# .gpu61): call 61's disaggregated set-up under MPS with the prefill process capped at PCT%
# of the multiprocessors (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, set for `tandem prefill` alone
# by a wrapper; the decode process uncapped): 1 req/s and saturation. Ran with PCTS=50, 80,
# 90 as three calls. Needs /tmp/g61 from call 61 or 63.
source docs/gpu-results/2026-12-05-eighth/common.sh c64
W=/tmp/g64; mkdir -p $W && cp -r /tmp/g61/gpu-1p1d $W/
printf '#!/bin/bash\nif [ "$1" = prefill ]; then export CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=${PCT:-50}; fi\nexec /tmp/g61/tandem "$@"\n' > $W/tandem
chmod +x $W/tandem
for p in ${PCTS:-50}; do
  PCT=$p RUST_LOG=info MPS=1 OUT=$O/mps$p GPU_DIR=$W SKIP512=1 NOCOLO=1 SAT=1 RATES="1" N=32 \
    timeout -s KILL 280 bash scripts/gpu_ttft.sh > $O/mps$p.out 2>&1
  echo "pct $p rc=$?"
  grep -E "^### |^MPS|Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL" $O/mps$p/ttft.md
  sed -n '/alone vs/,$p' $O/mps$p/ttft.md | tail -3
done
echo quit | CUDA_MPS_PIPE_DIRECTORY=/tmp/tandem-ttft/mps-pipe nvidia-cuda-mps-control 2>/dev/null; true
