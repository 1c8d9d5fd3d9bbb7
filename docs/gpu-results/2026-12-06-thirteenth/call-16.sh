#!/usr/bin/env bash
# Device call 16 (thirteenth session): the TMA boxes of a tile issued by the
# producer's first warp, one lane per box, instead of by one thread (lanes/: this
# checkout, 128-key tiles, 3 stages; lanes64/: the same kernel source with main's
# 64-key tiles and 4 stages, under main's binary .gpu24/base). Call 15 found
# blocks of 64 or 128 (8 or 4 boxes a tile) 9-14% faster than blocks of 16 (32
# boxes) for the 32k prompt's last chunk with one thread issuing. Here: `attn`
# (checks against mma.sync, then speed) of lanes, its GPU tests, the 8B prefill
# with main and lanes taking turns twice with SDPA between, `attn` with blocks of
# 8 (two boxes a lane), then the speed of lanes64 and main.
# Carry .gpu24 and .gpu26. DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c16
B=$PWD/.gpu24/base L=$PWD/.gpu26/lanes L64=$PWD/.gpu26/lanes64
unxz_to /tmp/gb .gpu24/base/tandem-gpu-bench.xz
unxz_to /tmp/gl .gpu26/lanes/tandem-gpu-bench.xz .gpu26/lanes/engine-tests.xz
env_line
show() { grep -E "^\| (8192|32768) \| [0-9.]+ \||worst|rror|panick" "$O/$1.md" | cut -c1-200; }
date -u +%T.%N; step attn-lanes 90 "$L/kernels" /tmp/gl/tandem-gpu-bench attn; show attn-lanes
date -u +%T.%N; step gpu-tests-lanes 150 "$L/kernels" /tmp/gl/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-lanes.md" | cut -c1-300
for round in 1 2; do
  date -u +%T.%N; step "prefill-main-$round" 30 "$B/kernels" /tmp/gb/tandem-gpu-bench bench --shape llama3-8b --only prefill
  date -u +%T.%N; step "prefill-lanes-$round" 30 "$L/kernels" /tmp/gl/tandem-gpu-bench bench --shape llama3-8b --only prefill
  [ "$round" = 1 ] && { date -u +%T.%N; step torch 45 "" /opt/torch/.venv/bin/python .gpu24/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
date -u +%T.%N; step attn-lanes-bs8 50 "$L/kernels" /tmp/gl/tandem-gpu-bench attn --block-size 8; show attn-lanes-bs8
date -u +%T.%N; step attn-lanes64 45 "$L64/kernels" /tmp/gb/tandem-gpu-bench attn --speed; show attn-lanes64
date -u +%T.%N; step attn-main 45 "$B/kernels" /tmp/gb/tandem-gpu-bench attn --speed; show attn-main
date -u +%T.%N
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
tar -C "$OUT" -czf "$OUT/c16.tgz" c16 && rm -rf "$O"
