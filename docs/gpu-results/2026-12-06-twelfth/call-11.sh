#!/usr/bin/env bash
# Device call 11 (twelfth session; written when its device time ran out, not yet run),
# first of two on one warm machine (call-12.sh next). Two patches of scripts/gpu-pending/:
#   silu-unrolled.patch: SiLU·up over the rows' values as one flat range, four 8-value
#     vectors a thread with all their loads issued before any is used (call 9's prefill
#     profile, an H100: the gate_up product and SiLU·up 3046 µs a layer for an 8192-token
#     chunk, the product alone ~2497, so SiLU·up moved 705 MB at ~1.3 TB/s or less);
#   residual-epilogue.patch: above one row the o and down products add into the f32
#     residual stream in cuBLAS's epilogue (beta = 1), and the norms after them only read
#     it (134 MB less moved per norm at 8192 rows).
# Here: every GPU test with each patch, then `kernels` with main, each patch (the
# prefill profiles time "gate_up product", "SiLU", the products and norms apart).
# Carry .gpu23 (`WHICH=23 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c11
M=$PWD/.gpu23/main S=$PWD/.gpu23/silu R=$PWD/.gpu23/resid
unxz_to /tmp/gm .gpu23/main/tandem-gpu-bench.xz
unxz_to /tmp/gs .gpu23/silu/tandem-gpu-bench.xz .gpu23/silu/engine-tests.xz
unxz_to /tmp/gr .gpu23/resid/tandem-gpu-bench.xz .gpu23/resid/engine-tests.xz
env_line
smi_start
date -u +%T.%N; step gpu-tests-silu 170 "$S/kernels" /tmp/gs/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-silu.md" | cut -c1-300
date -u +%T.%N; step gpu-tests-resid 170 "$R/kernels" /tmp/gr/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-resid.md" | cut -c1-300
date -u +%T.%N; step kernels-main 60 "$M/kernels" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-silu 60 "$S/kernels" /tmp/gs/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-resid 60 "$R/kernels" /tmp/gr/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N
smi_stop
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^Kernel by kernel, a prefill|^\| (gate_up product|SiLU|o product|down product|input norm|post-attention norm) \||^\| 4 \| " "$f"; done
tar -C "$OUT" -czf "$OUT/c11.tgz" c11 && rm -rf "$O"
