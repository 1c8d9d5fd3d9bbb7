#!/usr/bin/env bash
# Device call C (eighth session): main's kernels with scripts/gpu-variants/
# sampling-loads-in-flight.patch applied (.gpu13/kernels-var: .gpu13/kernels with the
# patched sampling.cu), under main's binaries: every GPU test, then `rows` (a step's
# cost by draw and logprobs asked) with main's kernels and the variant's, taking turns.
# Carry .gpu13. DEADLINE_S (580).
set -u
source "$(dirname "$0")/common.sh" c
G=/tmp/gpu13 MAIN=$PWD/.gpu13/kernels VAR=$PWD/.gpu13/kernels-var
unxz_to "$G" .gpu13/tandem-gpu-bench.xz .gpu13/engine-tests.xz
env_line
step gpu-tests-var 170 "$VAR" "$G/engine-tests" --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-var.md" | cut -c1-300
step rows-main 50 "$MAIN" "$G/tandem-gpu-bench" rows --shape llama3-8b
step rows-var 50 "$VAR" "$G/tandem-gpu-bench" rows --shape llama3-8b
for f in "$O"/rows-*.md; do echo "== $f"; grep -E "^\| (1|64) \|" "$f"; done
