#!/usr/bin/env bash
# Device call 20 (written in the thirteenth session; not yet run):
# prefill-tma-pairs.patch (pairs/: the Hopper prefill attention launched as
# clusters of two CTAs, adjacent query tiles of one head, each K/V box issued once
# and multicast to both: half the TMA boxes per SM and half the keys read from L2).
# Calls 14-16 found the box count, not its issue, limiting the 32k chunk at blocks
# of 16. The patch has not run: a barrier mistake would hang, so `attn` goes first
# under a short limit, then the GPU tests. Then the pass with pairs off
# (`TANDEM_CUDA_TMA_PAIRS=0`, same binary) and on, taking turns, at blocks of 16
# and 64; then the 8B prefill likewise. ~300 s. Carry .gpu27. DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c20
P=$PWD/.gpu27/pairs
unxz_to /tmp/gp .gpu27/pairs/tandem-gpu-bench.xz .gpu27/pairs/engine-tests.xz
env_line
smi_start
show() { grep -E "^\| (77|4097|12345|8192|32768) \||worst|rror|panick" "$O/$1.md" | cut -c1-220; }
date -u +%T.%N; step attn-pairs 60 "$P/kernels" /tmp/gp/tandem-gpu-bench attn; show attn-pairs
if grep -q "worst L2 rel err" "$O/attn-pairs.md"; then
  date -u +%T.%N; step gpu-tests-pairs 150 "$P/kernels" /tmp/gp/engine-tests --ignored cuda:: --test-threads 1
  grep -E "^test result|FAILED|panicked" "$O/gpu-tests-pairs.md" | cut -c1-300
  for round in 1 2; do
    for bs in 16 64; do
      date -u +%T.%N; step "attn-alone-bs$bs-$round" 40 "$P/kernels" env TANDEM_CUDA_TMA_PAIRS=0 /tmp/gp/tandem-gpu-bench attn --speed --block-size $bs; show "attn-alone-bs$bs-$round"
      date -u +%T.%N; step "attn-pairs-bs$bs-$round" 40 "$P/kernels" /tmp/gp/tandem-gpu-bench attn --speed --block-size $bs; show "attn-pairs-bs$bs-$round"
    done
  done
  for round in 1 2; do
    date -u +%T.%N; step "prefill-alone-$round" 45 "$P/kernels" env TANDEM_CUDA_TMA_PAIRS=0 /tmp/gp/tandem-gpu-bench bench --shape llama3-8b --only prefill
    date -u +%T.%N; step "prefill-pairs-$round" 45 "$P/kernels" /tmp/gp/tandem-gpu-bench bench --shape llama3-8b --only prefill
  done
else
  echo "attn with pairs did not finish: the rest skipped"
fi
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||rror|panick" "$f"; done
tar -C "$OUT" -czf "$OUT/c20.tgz" c20 && rm -rf "$O"
