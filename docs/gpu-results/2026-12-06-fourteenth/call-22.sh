#!/usr/bin/env bash
# Device call 22 (written in the fourteenth session; not yet run): tune-at-start.patch
# (scripts/gpu-pending/): the CUDA backend times cuBLASLt's candidates for every
# product of a tuned row count (the decode buckets, a full pass) when it is made,
# instead of in the first request whose pass has that many rows. Call 21's smoke had
# a 24-token local prefill on the decode node wait 324 ms for it (TTFT 7.0 ms before
# the tuning existed).
# - The GPU tests with the patch (a longer limit than call 21's: a cold machine pays
#   the kernels' NVRTC compile in the first tests, and each backend now tunes).
# - scripts/gpu_1p1d_smoke.sh with the patch: the second long prompt's TTFT, and the
#   nodes' log line "timed cuBLASLt's candidates ..." with its seconds.
# - The 8B decode (`bench --only decode --batches 1,64,256`) with main and with the
#   patch: the steps must not change (the same algorithms are picked, only earlier),
#   and `bench`'s "set-up" time shows what the start-up tuning costs.
# Carry .gpu29 (`WHICH=29 bash scripts/gpu-pending/prepare.sh`). ~450 s. DEADLINE_S
# (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c22
M=$PWD/.gpu29/main P=$PWD/.gpu29/tune
unxz_to /tmp/gm .gpu29/main/tandem-gpu-bench.xz
unxz_to /tmp/gt .gpu29/tune/tandem-gpu-bench.xz .gpu29/tune/engine-tests.xz .gpu29/tune/tandem.xz
cp -r "$P/gpu-1p1d" /tmp/gt/
env_line
smi_start
date -u +%T.%N; step gpu-tests 240 "$P/kernels" /tmp/gt/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step smoke 150 "" env GPU_DIR=/tmp/gt OUT="$O/smoke" bash scripts/gpu_1p1d_smoke.sh
head -12 "$O/smoke.md" | cut -c1-300
grep -h "timed cuBLASLt" "$O"/smoke/*.log | cut -c1-300
date -u +%T.%N; step decode-main 150 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N; step decode-tune 150 "$P/kernels" /tmp/gt/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N
smi_stop
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "set-up|^Floor|^\| (1024|4096) \| (1|64|256) \|" "$f" | cut -c1-200; done
tar -C "$OUT" -czf "$OUT/c22.tgz" c22 && rm -rf "$O"
