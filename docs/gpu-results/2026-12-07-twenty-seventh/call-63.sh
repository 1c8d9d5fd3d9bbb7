#!/usr/bin/env bash
# Device call 63 (twenty-seventh session; after call-61 on the same warm H100, carry .gpu61):
# the disaggregated set-up of call 61 without the MPS daemon (two processes time-slicing the
# GPU), 32 x 4096/128 at 1 req/s and the saturation run. Run as one command line; kept here.
source docs/gpu-results/2026-12-05-eighth/common.sh c63
G=/tmp/g61; [ -x $G/tandem ] || { mkdir -p $G && cp -r .gpu61/gpu-1p1d $G/ && unxz_to $G .gpu61/tandem.xz; }
RUST_LOG=info OUT=$O/nomps GPU_DIR=$G SKIP512=1 NOCOLO=1 SAT=1 RATES="1" N=32 \
  timeout -s KILL 300 bash scripts/gpu_ttft.sh > $O/nomps.out 2>&1
echo rc=$?
grep -E "^### |Successful|Output token throughput|Median TTFT|Mean TTFT|P99 TTFT|Median TPOT|P99 ITL" $O/nomps/ttft.md
sed -n '/alone vs/,$p' $O/nomps/ttft.md
