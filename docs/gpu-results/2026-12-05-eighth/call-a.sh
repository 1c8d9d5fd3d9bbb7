#!/usr/bin/env bash
# Device call A (issue 15, eighth session; wanted on an H200): the GPU tests with the
# L2 bound the larger of 1e-2 and the model's bf16 noise (all 14 should pass), the
# decode sweep of main (.gpu13) and of 28df44d (.gpu8/old, before the large-batch
# decode kernels) taking turns, then where main's decode step goes (`kernels`).
# Carry .gpu13 and .gpu8. DEADLINE_S (580): steps that might not end within it are skipped.
set -u
source "$(dirname "$0")/common.sh" a
G=/tmp/gpu13 MAIN=$PWD/.gpu13/kernels OLD=$PWD/.gpu8/old/kernels
unxz_to "$G" .gpu13/tandem-gpu-bench.xz .gpu13/engine-tests.xz
env_line
step gpu-tests 170 "$MAIN" "$G/engine-tests" --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
step decode-main-1 110 "$MAIN" "$G/tandem-gpu-bench" bench --shape llama3-8b --only decode
step decode-old-1 110 "$OLD" .gpu8/old/tandem-gpu-bench bench --shape llama3-8b --only decode
step kernels 100 "$MAIN" "$G/tandem-gpu-bench" kernels --shape llama3-8b
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|64|256) \|" "$f"; done
