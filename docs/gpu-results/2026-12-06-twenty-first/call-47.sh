#!/usr/bin/env bash
# Device call 47 (twenty-first session, written without device time; ~420 s on an H200, carry
# .gpu46 and .gpu47): prefill-heads-fastest.patch. The prefill attention's grid was (query
# tile, head, chunk), the longest tile first within each head, so the blocks of the last
# heads' longest tiles were dispatched near the end of the launch and ran past the rest. With
# heads varying fastest every head's longest tile goes first and the short causal tiles fill
# the tail. A list-scheduling model (132 multiprocessors, one block each, a tile's time its
# key tiles) gives 5.5% off an 8k chunk's attention after 0 cached keys (534 -> 505 units),
# 13% off a 4k one; call 44 had the 8k chunk at 526 TFLOP/s against 602 for the last chunk
# of 32k, whose tiles are near-equal.
# 1. Every GPU test with the patch (prefill against the CPU, chunked and prefix-cached).
# 2. `attn --layers 1` with the patch: the Hopper kernel against the portable one, both
#    with the new grid.
# 3. `attn --speed` (an 8k chunk after 0 and after 24,576 cached keys): main, patch, main,
#    patch.
# 4. `bench --only prefill`: main, patch, main, patch (1k, 8k, 32k).
# Carry .gpu46 (d0eb820: main) and .gpu47 (the same with the patch: tandem-gpu-bench and
# engine-tests, xz, and kernels). DEADLINE_S (480).
set -u
DEADLINE_S=${DEADLINE_S:-480}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c47
unxz_to /tmp/g46 .gpu46/tandem-gpu-bench.xz
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz .gpu47/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c47.tgz" c47; }
date -u +%T; step gpu-tests 150 "$PWD/.gpu47/kernels" /tmp/g47/engine-tests --ignored cuda:: --test-threads 1
grep -E "FAILED|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
date -u +%T; step attn-check 60 "$PWD/.gpu47/kernels" /tmp/g47/tandem-gpu-bench attn --layers 1
grep -E "^\||rror|panick" "$O/attn-check.md" | tail -12 | cut -c1-160; save
for r in 1 2; do
  for v in 46 47; do
    date -u +%T; step "speed-$v-$r" 40 "$PWD/.gpu$v/kernels" /tmp/g$v/tandem-gpu-bench attn --speed
    grep -E "^\| " "$O/speed-$v-$r.md" | tail -4 | cut -c1-160; save
  done
done
for r in 1 2; do
  for v in 46 47; do
    date -u +%T; step "prefill-$v-$r" 50 "$PWD/.gpu$v/kernels" /tmp/g$v/tandem-gpu-bench bench \
      --shape llama3-8b --only prefill
    grep -E "^\| (1024|8192|32768) \|" "$O/prefill-$v-$r.md" | cut -c1-90; save
  done
done
smi_stop
save
