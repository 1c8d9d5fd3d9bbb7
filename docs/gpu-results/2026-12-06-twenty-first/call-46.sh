#!/usr/bin/env bash
# Device call 46 (twenty-first session; ~380 s, carry .gpu46 = d0eb820's tandem-gpu-bench and
# engine-tests, xz, and kernels): main as it now is, checked and timed once more.
# 1. Every GPU test (the tile's block-table read and the row prefetch chosen by card on main).
# 3. `bench --only decode --batches 1,64,256 --tables rows`: the sweep with main's defaults
#    (no row prefetch on an H200), and the row-prefetch table.
# 2. Call 41's steps that call 42 left out: a 32k sequence among 63 of 4k and among 255 of
#    1k, the four-wave rule against 4096 blocks (the rule gives the long one few, long splits),
#    and the split map at b32-b256 (`--decode-splits 1,2,3,4,6`).
# DEADLINE_S (480).
set -u
DEADLINE_S=${DEADLINE_S:-480}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c46
K=$PWD/.gpu46/kernels
unxz_to /tmp/g46 .gpu46/tandem-gpu-bench.xz .gpu46/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c46.tgz" c46; }
date -u +%T; step gpu-tests 150 "$K" /tmp/g46/engine-tests --ignored cuda:: --test-threads 1
grep -E "FAILED|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
date -u +%T; step outlier 60 "$K" /tmp/g46/tandem-gpu-bench kernels --shape llama3-8b \
  --decode-shapes 4096:63+32768:1,1024:255+32768:1 --decode-blocks 4096
grep -E "^\| (1024|4096)" "$O/outlier.md" | cut -c1-140; save
date -u +%T; step decode 100 "$K" /tmp/g46/tandem-gpu-bench bench --shape llama3-8b --only decode \
  --batches 1,64,256 --tables rows
grep -E "^Floor|^\| (1024|4096) \| " "$O/decode.md" | cut -c1-200; save
date -u +%T; step split-map 90 "$K" /tmp/g46/tandem-gpu-bench kernels --shape llama3-8b \
  --decode-shapes 1024:32,1024:64,1024:128,1024:256,4096:32,4096:128 --decode-splits 1,2,3,4,6
grep -E "^\| (1024|4096) " "$O/split-map.md" | cut -c1-120
smi_stop
save
