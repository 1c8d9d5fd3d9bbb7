#!/usr/bin/env bash
# Device call 40 (twentieth session; ~350 s, carry .gpu40): decode attention's blocks aimed at
# four waves against the backend's rule (4096 blocks), over the decode batch sizes that use
# the rule. On H100s about four waves beat the rule's ten in 31 of 32 runs of the 4-layer
# b256 step (calls 35, 38, 39: 2-3%; b64 4k ~1%), on the H200 not (eight runs, mixed); the
# split is a launch setting, so a rule by card needs the full model's step at every batch
# size that uses it, not only b256 1k and b64 4k in 4 layers.
# 1. `bench --only decode --batches 1`, twice (two processes): the b1 sweep, then its A/B
#    tables; the new one times 32-layer steps at b32, b64, b128 and b256, 1k and 4k context,
#    the rule and four waves taking turns three times. The header prints the driver's DRAM
#    peak per multiprocessor, the figure a rule by card would read.
# Carry .gpu40 (this checkout's tandem-gpu-bench, xz, and kernels). DEADLINE_S (450).
set -u
DEADLINE_S=${DEADLINE_S:-450}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c40
unxz_to /tmp/g40 .gpu40/tandem-gpu-bench.xz
env_line
smi_start
for r in 1 2; do
  date -u +%T; step "decode-$r" 200 "$PWD/.gpu40/kernels" /tmp/g40/tandem-gpu-bench bench \
    --shape llama3-8b --only decode --batches 1
  grep -E "^DRAM|^###|^\| (1024|4096) \| " "$O/decode-$r.md" | cut -c1-200
  tar -C "$OUT" -czf "$OUT/c40.tgz" c40
done
date -u +%T
smi_stop
tar -C "$OUT" -czf "$OUT/c40.tgz" c40
