#!/usr/bin/env bash
# Device call E (issue 15; written in the eighth session, not yet run): the split-K gemv
# (scripts/gpu-pending/gemv-split-k.patch: 1, 2 or 4 warps per output row so a batch-1
# product makes at least two waves). Every GPU test with it, then `kernels` (its
# product table gives µs per product at 1 row) and the decode sweep, main and split
# taking turns. Carry .gpu14 (scripts/gpu-pending/prepare.sh, WHICH=14). DEADLINE_S (580).
set -u
source "$(dirname "$0")/common.sh" e
MAIN=$PWD/.gpu14/main/kernels SPLIT=$PWD/.gpu14/split/kernels
unxz_to /tmp/g14/main .gpu14/main/tandem-gpu-bench.xz
unxz_to /tmp/g14/split .gpu14/split/tandem-gpu-bench.xz .gpu14/split/engine-tests.xz
env_line
step gpu-tests-split 170 "$SPLIT" /tmp/g14/split/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-split.md" | cut -c1-300
step kernels-main 40 "$MAIN" /tmp/g14/main/tandem-gpu-bench kernels --shape llama3-8b
step kernels-split 40 "$SPLIT" /tmp/g14/split/tandem-gpu-bench kernels --shape llama3-8b
step decode-split-1 95 "$SPLIT" /tmp/g14/split/tandem-gpu-bench bench --shape llama3-8b --only decode
step decode-main-1 95 "$MAIN" /tmp/g14/main/tandem-gpu-bench bench --shape llama3-8b --only decode
step decode-split-2 95 "$SPLIT" /tmp/g14/split/tandem-gpu-bench bench --shape llama3-8b --only decode
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^\| [a-z_]+ \([0-9]+ × [0-9]+\) \| 1 \||graph replay" "$f" | head -8; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|8|64|256) \|" "$f"; done
