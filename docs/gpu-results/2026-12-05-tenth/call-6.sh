#!/usr/bin/env bash
# Device call 6 of the tenth session (issue 15, batch-1 decode; written when the session's
# device time ran out, not yet run). Two fusions at one token, each a pending patch:
#   rope  (scripts/gpu-pending/gemv-rope-kv.patch): the qkv product, its bias, the rotary
#         embedding and the K/V cache write in one kernel (rope_kv's launch gone);
#   norm  (gemv-add-rmsnorm.patch, on top of rope): the o and down products each end with
#         the RMSNorm after them, done by the kernel's last block (two norm launches a
#         layer gone, and the final norm).
# `kernels` main, rope, rope+norm (the 4-layer b1 graph replay is the figure), the quick
# decode sweep taking turns, then every GPU test of rope+norm (fp8 caches, biases, the
# every-logit test included). Carry .gpu14 (main/), .gpu17 (rope) and .gpu18 (rope+norm):
# `WHICH="14 17 18" bash scripts/gpu-pending/prepare.sh`. DEADLINE_S (580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c6
MAIN=$PWD/.gpu14/main/kernels ROPE=$PWD/.gpu17/kernels NORM=$PWD/.gpu18/kernels
unxz_to /tmp/g14 .gpu14/main/tandem-gpu-bench.xz
unxz_to /tmp/g17 .gpu17/tandem-gpu-bench.xz
unxz_to /tmp/g18 .gpu18/tandem-gpu-bench.xz .gpu18/engine-tests.xz
env_line
# Clocks and power through the call (is the H200 power-capped under sustained load?).
smi_start
date -u +%T.%N; step kernels-main 40 "$MAIN" /tmp/g14/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-rope 40 "$ROPE" /tmp/g17/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-norm 40 "$NORM" /tmp/g18/tandem-gpu-bench kernels --shape llama3-8b
grep -H "graph replay" "$O"/kernels-*.md | head -6
date -u +%T.%N; step decode-norm-1 80 "$NORM" /tmp/g18/tandem-gpu-bench bench --shape llama3-8b --only decode --quick
date -u +%T.%N; step decode-main-1 80 "$MAIN" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode --quick
date -u +%T.%N; step gpu-tests 170 "$NORM" /tmp/g18/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step decode-norm-2 80 "$NORM" /tmp/g18/tandem-gpu-bench bench --shape llama3-8b --only decode --quick
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^\| 4 \| 1024 \| 1 \||^\| [a-z_]+ \(6144|graph replay" "$f" | head -5; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|64) \|" "$f"; done
smi_stop
