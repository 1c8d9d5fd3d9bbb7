#!/usr/bin/env bash
# Device call 26 (written in the fifteenth session, not yet run; ~480 s, after call-25
# on its warm machine or alone): gemm-split-k-variants.patch (scripts/gpu-pending/).
# The cuBLASLt tuning times, beside each heuristic candidate that splits nothing,
# its split-K ×2 and ×4 variants (f32 reduction in the workspace), for products of at
# most 256 rows. On the H200 (call 23) the b256 products ran below the tensor cores'
# rate: o 16.5 µs (520 TFLOP/s; 64 tiles of 128 × 128 for 132 SMs), qkv 22.2 (572),
# down 47.9 (628); issue 15's b256 figure is 1.42 of the floor against ≤ 1.4, 0.23 ms a
# step. Each variant cuBLASLt refuses (cublasLtMatmulAlgoCheck) is left out.
# - The GPU tests with the patch (the tuned products' test checks the algorithms kept
#   against cuBLAS's own and the host).
# - `kernels` with main and with the patch: the tuning table (now with the kept
#   candidate's split-K factor and the heuristic's count) and the b256 step kernel by
#   kernel.
# - The 8B decode at b64/b256 with main and with the patch: the step table first (the
#   run is cut at its limit during the sampling check, which comes last).
# Carry .gpu31 (`WHICH=31 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c26
M=$PWD/.gpu31/main P=$PWD/.gpu31/split
unxz_to /tmp/gm .gpu31/main/tandem-gpu-bench.xz
unxz_to /tmp/gp .gpu31/split/tandem-gpu-bench.xz .gpu31/split/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c26.tgz" c26; }
date -u +%T.%N; step gpu-tests 220 "$P/kernels" /tmp/gp/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300; save
for v in main split; do
  b=/tmp/gm; k=$M/kernels; [ "$v" = split ] && { b=/tmp/gp; k=$P/kernels; }
  date -u +%T.%N; step "kernels-$v" 60 "$k" "$b/tandem-gpu-bench" kernels --shape llama3-8b
  grep -E "^\| (qkv|o|gate_up|down|lm_head) \| (64|128|256) \|" "$O/kernels-$v.md" | cut -c1-200; save
done
for v in main split; do
  b=/tmp/gm; k=$M/kernels; [ "$v" = split ] && { b=/tmp/gp; k=$P/kernels; }
  date -u +%T.%N; step "decode-$v" 95 "$k" "$b/tandem-gpu-bench" bench --shape llama3-8b --only decode --batches 64,256
  grep -E "^Floor|^\| (1024|4096) \| (64|256) \|" "$O/decode-$v.md" | cut -c1-200; save
done
date -u +%T.%N
smi_stop
save
