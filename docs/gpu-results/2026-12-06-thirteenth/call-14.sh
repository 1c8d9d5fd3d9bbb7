#!/usr/bin/env bash
# Device call 14 (thirteenth session): K and V of each stage released apart in the
# warp-specialized prefill attention (K once the scores have read it, V once P V
# has, so K's loads run further ahead), with 128-key tiles and 3 stages (split/,
# this checkout) and with main's 64-key tiles and 4 stages (split64/: the same
# kernel source under main's binary, .gpu24/base). Call 13 found 128-key tiles
# with a joint release 10% slower than main in the attention (8546 -> 9386 µs a
# layer at 32k) though correct. Here: `attn` (checks against mma.sync, then the
# speed of the last 8k chunk) for split (bf16 by TMA and copies, fp8, blocks of
# 24 with a window, blocks of 128), split64 and main; the 8B
# prefill with main, split and split64 taking turns twice with SDPA between;
# `kernels` of split. The GPU tests of split run second.
# Carry .gpu24 and .gpu25. DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c14
B=$PWD/.gpu24/base S=$PWD/.gpu25/split S64=$PWD/.gpu25/split64
unxz_to /tmp/gb .gpu24/base/tandem-gpu-bench.xz
unxz_to /tmp/gs .gpu25/split/tandem-gpu-bench.xz .gpu25/split/engine-tests.xz
env_line
smi_start
show() { grep -E "^\| (8192|32768) \| [0-9.]+ \||worst|rror|panick|hung" "$O/$1.md" | cut -c1-200; }
date -u +%T.%N; step attn-split 120 "$S/kernels" /tmp/gs/tandem-gpu-bench attn; show attn-split
date -u +%T.%N; step gpu-tests-split 170 "$S/kernels" /tmp/gs/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-split.md" | cut -c1-300
date -u +%T.%N; step attn-split64 90 "$S64/kernels" /tmp/gb/tandem-gpu-bench attn; show attn-split64
date -u +%T.%N; step attn-main 90 "$B/kernels" /tmp/gb/tandem-gpu-bench attn --speed; show attn-main
date -u +%T.%N; step attn-split-fp8 60 "$S/kernels" /tmp/gs/tandem-gpu-bench attn --kv-dtype fp8_e4m3; show attn-split-fp8
date -u +%T.%N; step attn-split-bs24-w3000 60 "$S/kernels" /tmp/gs/tandem-gpu-bench attn --block-size 24 --window 3000; show attn-split-bs24-w3000
date -u +%T.%N; step attn-split-bs128 60 "$S/kernels" /tmp/gs/tandem-gpu-bench attn --block-size 128; show attn-split-bs128
for round in 1 2; do
  for v in main:gb:$B split:gs:$S split64:gb:$S64; do
    IFS=: read -r name bin dir <<< "$v"
    date -u +%T.%N; step "prefill-$name-$round" 45 "$dir/kernels" "/tmp/$bin/tandem-gpu-bench" bench --shape llama3-8b --only prefill
  done
  [ "$round" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python .gpu24/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
date -u +%T.%N; step kernels-split 60 "$S/kernels" /tmp/gs/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
grep -E "^Kernel by kernel, a prefill|^\| prefill_attn" "$O/kernels-split.md"
tar -C "$OUT" -czf "$OUT/c14.tgz" c14 && rm -rf "$O"
