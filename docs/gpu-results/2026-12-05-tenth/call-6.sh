#!/usr/bin/env bash
# Device call 6 of the tenth session (issue 15, batch-1 decode): `gemv_rope_kv`, the qkv
# product, its bias, the rotary embedding and the K/V cache write in one kernel at one
# token (rope_kv's launch gone; two weight rows a warp, as gemv_silu). With the last
# seconds of the session's device time: `kernels` with it and without (its 4-layer
# graph replay at batch 1 is the figure), then its GPU test at batch 1 against the CPU.
# Carry .gpu17 (this change: tandem-gpu-bench, engine-tests, kernels) and .gpu14 (main/).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c6
NEW=$PWD/.gpu17/kernels MAIN=$PWD/.gpu14/main/kernels
unxz_to /tmp/g17 .gpu17/tandem-gpu-bench.xz .gpu17/engine-tests.xz
unxz_to /tmp/g14 .gpu14/main/tandem-gpu-bench.xz
env_line
step kernels-new 40 "$NEW" /tmp/g17/tandem-gpu-bench kernels --shape llama3-8b
grep -E "graph replay" "$O/kernels-new.md" | head -2
step kernels-main 40 "$MAIN" /tmp/g14/tandem-gpu-bench kernels --shape llama3-8b
grep -E "graph replay" "$O/kernels-main.md" | head -2
step gpu-test 60 "$NEW" /tmp/g17/engine-tests --ignored "${TESTS:-gpu_matches_cpu_qwen2_biases}" --test-threads 1
grep -E "^test |test result|panicked" "$O/gpu-test.md" | cut -c1-300
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^\| 4 \| 1024 \| 1 \||^\| (qkv|rope|input|decode_attn)" "$f" | head -8; done
