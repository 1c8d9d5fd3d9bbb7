#!/usr/bin/env bash
# Device call 31 (written in the sixteenth session; ran in the eighteenth on an H100, 446 s,
# raw output in call-31/; the patch was dropped and sits beside this script; carry .gpu32):
# gemm-tile-variants.patch. At up to 256 rows the cuBLASLt tuning
# also times each heuristic candidate's algorithm with its other tile sizes (the
# algorithm's CUBLASLT_ALGO_CAP_TILE_IDS, each with the first stage count and cluster
# shape cuBLASLt accepts; at most 48 a shape). At 256 rows the o product is 64 tiles of
# 128 x 128 for 132 multiprocessors and ran at 520 TFLOP/s on the H200; split-K variants
# (call 26) were never kept. Issue 15's b256 figure on the H200 is 1.42 of the floor
# against <= 1.4 (0.23 ms a step). TANDEM_CUDA_GEMM_TILE_VARIANTS=0 turns the variants off,
# so one binary times both:
# 1. The GPU tests (the tuned products' test checks every kept algorithm against cuBLAS's
#    own and the host).
# 2. `kernels` without and with the variants: the tuning table (the kept candidate's rank
#    among the heuristic's and the variants, and its tile id) and the b256 step kernel by
#    kernel; the tuning's start-up time is in the log.
# 3. The 8B decode at b64/b256 without and with (the step table first; the run is cut at
#    its limit during the sampling check, which comes last).
# Carry .gpu32 (`WHICH=32 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c31
P=$PWD/.gpu32/tiles
unxz_to /tmp/gp .gpu32/tiles/tandem-gpu-bench.xz .gpu32/tiles/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c31.tgz" c31; }
date -u +%T.%N; step gpu-tests 220 "$P/kernels" /tmp/gp/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300; save
for v in 0 1; do
  export TANDEM_CUDA_GEMM_TILE_VARIANTS=$v
  date -u +%T.%N; step "kernels-$v" 60 "$P/kernels" /tmp/gp/tandem-gpu-bench kernels --shape llama3-8b
  grep -E "^\| (qkv|o|gate_up|down|lm_head) \| (64|128|256) \|" "$O/kernels-$v.md" | cut -c1-200; save
done
for v in 0 1; do
  export TANDEM_CUDA_GEMM_TILE_VARIANTS=$v
  date -u +%T.%N; step "decode-$v" 95 "$P/kernels" /tmp/gp/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 64,256
  grep -E "^Floor|^\| (1024|4096) \| (64|256) \|" "$O/decode-$v.md" | cut -c1-200; save
done
date -u +%T.%N
smi_stop
save
