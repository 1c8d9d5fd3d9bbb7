#!/usr/bin/env bash
# Device call D (issue 15, eighth session): decode_attn merging its own splits (the
# last split of a sequence and KV head to finish; attn_combine gone), .gpu14, against
# main before it (.gpu13 with the sampling kernels now on main, .gpu13/kernels-var):
# every GPU test, the decode sweep new and old taking turns, then `kernels` (new).
# Carry .gpu13 and .gpu14 (.gpu14: prepare.sh's folder 13 built from a checkout with
# decode-attn-merged-splits.patch, in this folder, applied). DEADLINE_S (580).
set -u
source "$(dirname "$0")/common.sh" d
OLD=$PWD/.gpu13/kernels-var NEW=$PWD/.gpu14/kernels
unxz_to /tmp/g13 .gpu13/tandem-gpu-bench.xz .gpu13/engine-tests.xz
unxz_to /tmp/g14 .gpu14/tandem-gpu-bench.xz .gpu14/engine-tests.xz
env_line
step gpu-tests-new 170 "$NEW" /tmp/g14/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-new.md" | cut -c1-300
step decode-new-1 95 "$NEW" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode
step decode-old-1 95 "$OLD" /tmp/g13/tandem-gpu-bench bench --shape llama3-8b --only decode
step kernels-new 40 "$NEW" /tmp/g14/tandem-gpu-bench kernels --shape llama3-8b
step decode-new-2 95 "$NEW" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|8|64|256) \|" "$f"; done
