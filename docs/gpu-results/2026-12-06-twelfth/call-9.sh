#!/usr/bin/env bash
# Device call 9 (twelfth session), first of two on one warm machine (call-10.sh next):
# cuBLASLt tuning of the products at the decode graph buckets' row counts and of full
# prefill passes (8192 rows).
#   - Every GPU test first (the tuning is on by default), gpu_tuned_products_match_cublas_own_and_the_host
#     among them; the `check` models decode their batches through the tuned products.
#   - `kernels`: its new table times cuBLAS's own pick against cuBLASLt's candidates per
#     product at 16-256 and 8192 rows; its layer figures run tuned; prefill chunks of 8192
#     tokens profiled kernel by kernel.
#   - `bench --only decode --batches 1,64,256`: its last table takes turns between tuned
#     and cuBLAS's own products at b64 and b256, 1k and 4k (graph replays).
#   - The 8B prefill: its table's last column runs the prompts with cuBLAS's own products.
# Clocks, power and throttle reasons logged every 100 ms (smi*.csv).
# Carry .gpu22 (`WHICH=22 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c9
K=$PWD/.gpu22/kernels
unxz_to /tmp/g22 .gpu22/tandem-gpu-bench.xz .gpu22/engine-tests.xz
env_line
smi_start
date -u +%T.%N; step gpu-tests 160 "$K" /tmp/g22/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step kernels 70 "$K" /tmp/g22/tandem-gpu-bench kernels --shape llama3-8b
grep -A40 "^cuBLASLt candidates" "$O/kernels.md" | grep -E "^\| [a-z_]+ \|" | cut -c1-150
date -u +%T.%N; step decode-1 140 "$K" /tmp/g22/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N; step prefill-1 100 "$K" /tmp/g22/tandem-gpu-bench bench --shape llama3-8b --only prefill
date -u +%T.%N
smi_stop
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$f"; grep -A8 -E "^### products with tuned" "$f" | grep -E "^\| [0-9]"; done
for f in "$O"/prefill-*.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \|" "$f"; done
grep -E "^\| [0-9]+ \| [0-9]+ \| (1|64|256) \|" "$O/kernels.md"
tar -C "$OUT" -czf "$OUT/c9.tgz" c9 && rm -rf "$O"
