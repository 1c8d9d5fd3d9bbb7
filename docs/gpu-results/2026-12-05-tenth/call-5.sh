#!/usr/bin/env bash
# Device call 5 of the tenth session (issue 15, batch-1 decode): `gemv` as a one-row
# kernel of its own (38 registers: 6 blocks a multiprocessor where the 1..8-row kernel's
# 67 allowed 3), and the copy-rate floor measured after half a second of copies as the
# best of three medians. Carry .gpu16 (this change: tandem-gpu-bench, engine-tests,
# kernels) and .gpu14 (main/: the binary before it). The GPU tests with it, `kernels`
# new and main, then the quick decode sweep (batch 1 and 64) new, main, new.
# DEADLINE_S (580). TESTS (default cuda::) picks the GPU tests: with 313 s of device time
# left, this session ran TESTS=gpu_matches_cpu_llama_head_dim_128 DEADLINE_S=200.
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c5
NEW=$PWD/.gpu16/kernels MAIN=$PWD/.gpu14/main/kernels
unxz_to /tmp/g16 .gpu16/tandem-gpu-bench.xz .gpu16/engine-tests.xz
unxz_to /tmp/g14 .gpu14/main/tandem-gpu-bench.xz
env_line
step gpu-tests 150 "$NEW" /tmp/g16/engine-tests --ignored "${TESTS:-cuda::}" --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
step kernels-new 40 "$NEW" /tmp/g16/tandem-gpu-bench kernels --shape llama3-8b
step kernels-main 40 "$MAIN" /tmp/g14/tandem-gpu-bench kernels --shape llama3-8b
step decode-new-1 70 "$NEW" /tmp/g16/tandem-gpu-bench bench --shape llama3-8b --only decode --quick
step decode-main-1 70 "$MAIN" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode --quick
step decode-new-2 70 "$NEW" /tmp/g16/tandem-gpu-bench bench --shape llama3-8b --only decode --quick
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^Copy|^\| [a-z_]+ \([0-9]+ × [0-9]+\) \| 1 \||^\| 4 \| 1024 \| 1 \||graph replay" "$f" | head -9; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|64) \|" "$f"; done
