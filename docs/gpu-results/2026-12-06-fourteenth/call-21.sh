#!/usr/bin/env bash
# Device call 21 (fourteenth session): main after e9ca8cc, which landed the 128-key
# prefill attention tiles (prefill-bk128-lanes.patch) and moved the GPU configs and
# `tandem-gpu-bench`'s timings to cache blocks of 64 (calls 17 and 19 decided it).
# - The GPU tests, and `attn` at blocks of 64 (the new default) and 16.
# - scripts/gpu_1p1d_smoke.sh: the three roles as processes from the gpu-1p1d configs
#   (now blocks of 64), a long prompt's KV over QUIC, the CPU's text beside it, and a
#   short `tandem bench` through the router.
# - Issue 15's prefill figures: 3 `bench --only prefill` taking turns with 2 SDPA runs.
# - One decode sweep at blocks of 64, if the time is left.
# Carry .gpu28 (`WHICH=28 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c21
M=$PWD/.gpu28/main
unxz_to /tmp/g28 .gpu28/main/tandem-gpu-bench.xz .gpu28/main/engine-tests.xz .gpu28/main/tandem.xz
cp -r "$M/gpu-1p1d" /tmp/g28/
env_line
smi_start
show() { grep -E "^\| (77|4097|12345|8192|32768) \||worst|rror|panick" "$O/$1.md" | cut -c1-220; }
date -u +%T.%N; step gpu-tests 150 "$M/kernels" /tmp/g28/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step attn-bs64 60 "$M/kernels" /tmp/g28/tandem-gpu-bench attn; show attn-bs64
date -u +%T.%N; step attn-bs16 40 "$M/kernels" /tmp/g28/tandem-gpu-bench attn --block-size 16; show attn-bs16
date -u +%T.%N; step smoke 150 "" env GPU_DIR=/tmp/g28 OUT="$O/smoke" bash scripts/gpu_1p1d_smoke.sh
cat "$O/smoke.md" | cut -c1-300 | head -60
for r in 1 2 3; do
  date -u +%T.%N; step "prefill-$r" 45 "$M/kernels" /tmp/g28/tandem-gpu-bench bench --shape llama3-8b --only prefill
  [ "$r" != 3 ] && { date -u +%T.%N; step "torch-$r" 60 "" /opt/torch/.venv/bin/python .gpu28/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
date -u +%T.%N; step decode 150 "$M/kernels" /tmp/g28/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch-*.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill|rror|panick" "$f"; done
for f in "$O"/decode.md; do echo "== $f"; grep -E "^Floor|^###|^\| (1024|4096) \| (1|64|256) \|" "$f"; done
tar -C "$OUT" -czf "$OUT/c21.tgz" c21 && rm -rf "$O"
