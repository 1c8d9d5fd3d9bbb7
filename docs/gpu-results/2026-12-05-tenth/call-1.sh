#!/usr/bin/env bash
# Device call 1 of the tenth session (issue 15 on whatever card comes; the targets are
# the H200's). Carry .gpu15 (main's engine-tests, WHICH=15) and .gpu14 (main/:
# tandem-gpu-bench and kernels, WHICH=14).
#  1. the CUDA forward_every_logit (prompt log probabilities) against
#     prefill-then-decode (the ninth session's call P);
#  2. every other GPU test of main;
#  3. the 8B prefill of main twice with transformers SDPA between (issue 15's
#     prefill ÷ SDPA, medians of 3 each).
# DEADLINE_S (580): steps that might not end within it are skipped.
set -u
D=$(dirname "$0")
source "$D/../2026-12-05-eighth/common.sh" c1
K=$PWD/engine/src/cuda/kernels
unxz_to /tmp/g15 .gpu15/engine-tests.xz
unxz_to /tmp/g14 .gpu14/main/tandem-gpu-bench.xz
env_line
step every-logit 40 "$K" /tmp/g15/engine-tests --ignored gpu_every_logit --test-threads 1
grep -E "^test |test result|panicked" "$O/every-logit.md" | cut -c1-300
step gpu-tests 180 "$K" /tmp/g15/engine-tests --ignored cuda:: --skip gpu_every_logit --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
MK=$PWD/.gpu14/main/kernels
step prefill-1 90 "$MK" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only prefill
step torch 120 "" /opt/torch/.venv/bin/python scripts/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
step prefill-2 90 "$MK" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only prefill
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
