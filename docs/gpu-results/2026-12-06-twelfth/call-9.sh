#!/usr/bin/env bash
# Device call 9 (twelfth session): cuBLASLt tuning of decode-sized products.
#   - Every GPU test, the new gpu_tuned_products_match_cublas_own_and_the_host among
#     them (tuned products against cuBLAS's own and the host); the `check` models decode
#     their batches through the tuned products.
#   - `kernels`: its new table times cuBLAS's own pick against cuBLASLt's candidates per
#     product at 16-256 rows; its layer figures run tuned.
#   - `bench --only decode --batches 1,64,256` twice: its last table takes turns between
#     tuned and cuBLAS's own products at b64 and b256, 1k and 4k (graph replays).
# Clocks, power and throttle reasons logged every 100 ms (smi*.csv).
# Carry .gpu21 (`WHICH=21 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c9
K=$PWD/.gpu21/kernels
unxz_to /tmp/g21 .gpu21/tandem-gpu-bench.xz .gpu21/engine-tests.xz
env_line
smi_start
date -u +%T.%N; step kernels 60 "$K" /tmp/g21/tandem-gpu-bench kernels --shape llama3-8b
grep -A32 "^cuBLASLt candidates" "$O/kernels.md" | grep -E "^\| [a-z]" | cut -c1-150
date -u +%T.%N; step decode-1 130 "$K" /tmp/g21/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N; step gpu-tests 190 "$K" /tmp/g21/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step decode-2 130 "$K" /tmp/g21/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N
smi_stop
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$f"; grep -A8 -E "^### products with tuned" "$f" | grep -E "^\| [0-9]"; done
grep -E "^\| [0-9]+ \| [0-9]+ \| 256 \|" "$O/kernels.md"
tar -C "$OUT" -czf "$OUT/c9.tgz" c9 && rm -rf "$O"
