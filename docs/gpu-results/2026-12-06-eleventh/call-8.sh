#!/usr/bin/env bash
# Device call 8 (eleventh session; written when its device time ran out, not yet run).
# Supersedes call-7 for the next card (an H200 first: issue 15's figures are set there).
#   - scripts/gpu-pending/gemv-add-rmsnorm-v2.patch: at batch 1 the o and down products end
#     with the RMSNorm after them, done by the kernel's last block, which now issues all its
#     loads before it uses one (the first version waited out an L2 round trip per step and
#     made the step 14% slower). Every GPU test (the check decodes with the norms fused and
#     apart), then `bench --only decode --batches 1,256` twice: its tables take turns in one
#     process (norms apart / fused; row prefetch none / 512 B / 1 KiB / 2 KiB / whole).
#   - batch 256: graph replays against direct launches (the H200's b256 step ran 3% slower
#     as a graph), with clocks, power and throttle reasons logged every 100 ms (smi*.csv).
#   - `kernels`, norms fused and apart (TANDEM_CUDA_FUSE_NORMS=0).
# Carry .gpu20 (`WHICH=20 bash scripts/gpu-pending/prepare.sh`). Output tarred (a call
# brings back at most 8 files). DEADLINE_S (default 580; ~420 s of steps).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c8
K=$PWD/.gpu20/kernels
unxz_to /tmp/g20 .gpu20/tandem-gpu-bench.xz .gpu20/engine-tests.xz
env_line
smi_start
date -u +%T.%N; step decode-1 120 "$K" /tmp/g20/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,256
date -u +%T.%N; step gpu-tests 170 "$K" /tmp/g20/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step kernels-fused 40 "$K" /tmp/g20/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-apart 40 "$K" env TANDEM_CUDA_FUSE_NORMS=0 /tmp/g20/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step decode-2 120 "$K" /tmp/g20/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,256
date -u +%T.%N
smi_stop
grep -H "graph replay" "$O"/kernels-*.md | grep "context 1024, batch 1," | cut -c1-60,200-
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|256) \|" "$f"; grep -A5 -E "^### (L2|norms)" "$f" | grep -E "^\| [0-9]"; done
tar -C "$OUT" -czf "$OUT/c8.tgz" c8 && rm -rf "$O"
