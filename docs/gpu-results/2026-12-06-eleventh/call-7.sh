#!/usr/bin/env bash
# Device call 7 (eleventh session; calls 1-6 are the tenth session's folder). Issue 15:
#   - the L2 prefetches at batch 1 (gemv warps ask L2 for their weight rows before their
#     PDL wait; the o product's weights fetched on a side stream during decode attention):
#     every GPU test with them on (the check decodes with and without them), then
#     `bench --only decode --batches 1,256`, whose prefetch table times b1 steps with none,
#     1 KiB of each gemv row, whole rows, o on the side stream, and 1 KiB + side, taking
#     turns three times in one process;
#   - batch 256 on this card: graph replays against direct launches (the H200's b256 step
#     ran slower as a graph), with the card's clocks, power and throttle reasons logged
#     every 100 ms through the call (smi.csv, smi-reasons.csv; the step lines give times).
# Ran 2026-12-06 on an H100 with DEADLINE_S=330 (raw output in call-7/). Carry .gpu19
# (48811f9's tandem-gpu-bench, engine-tests and kernels, xz; main dropped the side stream
# after this call: l2-prefetch-side-stream.patch, against 658a399, puts it back). Everything
# lands in one folder, tarred at the end (a call brings back at most 8 files).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c7
K=$PWD/.gpu19/kernels
unxz_to /tmp/g19 .gpu19/tandem-gpu-bench.xz .gpu19/engine-tests.xz
env_line
smi_start
date -u +%T.%N; step decode-1 110 "$K" /tmp/g19/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,256
date -u +%T.%N; step gpu-tests 170 "$K" /tmp/g19/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step kernels-on 40 "$K" /tmp/g19/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-off 40 "$K" env TANDEM_CUDA_PREFETCH_ROWS=0 TANDEM_CUDA_PREFETCH_SIDE=0 /tmp/g19/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step decode-2 110 "$K" /tmp/g19/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,256
date -u +%T.%N
smi_stop
grep -H "graph replay" "$O"/kernels-*.md | grep "context 1024, batch 1," | cut -c1-60,200-
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|256) \||^### L2|^\| context \| none" -A0 "$f"; grep -A4 "^| context | none" "$f" | tail -2; done
tar -C "$OUT" -czf "$OUT/c7.tgz" c7 && rm -rf "$O"
