#!/usr/bin/env bash
# Device call 47 (twenty-first session, written without device time; ~450 s on an H200, carry
# .gpu46 and .gpu47): two prefill patches, checked together and timed apart.
# - prefill-heads-fastest.patch (host grid and kernels): the prefill attention's grid was
#   (query tile, head, chunk), the longest tile first within each head, so the blocks of the
#   last heads' longest tiles were dispatched near the end of the launch and ran past the
#   rest. With heads varying fastest every head's longest tile goes first and the short
#   causal tiles fill the tail. A list-scheduling model (132 multiprocessors, one block each,
#   a tile's time its key tiles) gives 5.5% off an 8k chunk's attention after 0 cached keys,
#   13% off a 4k one; call 44 had the 8k chunk at 526 TFLOP/s against 602 for the last chunk
#   of 32k, whose tiles are near-equal.
# - rope-kv-wide.patch (kernels only): rope_kv moves 16 bytes a thread where hd is a multiple
#   of 16, its first loads issued before the angles are computed and shared (call 44: 90 µs a
#   layer for an 8k chunk, where the copy rate gives ~47). ptxas: 30 -> 50 registers (2
#   blocks of 512 a multiprocessor instead of 4).
# 1. Every GPU test with both (.gpu47's binary, kernels-both/): prefill and decode against
#    the CPU, head sizes 32 and 128, biases, fp8 caches.
# 2. `attn --layers 1` with both: the Hopper kernel against the portable one, both on the new
#    grid.
# 3. `attn --speed` (an 8k chunk after 0 and after 24,576 cached keys): main, heads-fastest,
#    twice.
# 4. `kernels` (main's binary): main's kernels, then rope-kv-wide's (kernels-rope/), twice:
#    rope_kv in a decode step and in a prefill pass.
# 5. `bench --only prefill`: main, both, twice (1k, 8k, 32k).
# Carry .gpu46 (d0eb820: main's tandem-gpu-bench, engine-tests, kernels) and .gpu47 (d0eb820
# with prefill-heads-fastest.patch: tandem-gpu-bench and engine-tests, xz; kernels/ its
# kernels, kernels-both/ with rope-kv-wide.patch too, kernels-rope/ main's with
# rope-kv-wide.patch). DEADLINE_S (520).
set -u
DEADLINE_S=${DEADLINE_S:-520}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c47
unxz_to /tmp/g46 .gpu46/tandem-gpu-bench.xz
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz .gpu47/engine-tests.xz
M=$PWD/.gpu46/kernels B=$PWD/.gpu47/kernels-both R=$PWD/.gpu47/kernels-rope
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c47.tgz" c47; }
date -u +%T; step gpu-tests 150 "$B" /tmp/g47/engine-tests --ignored cuda:: --test-threads 1
grep -E "FAILED|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
date -u +%T; step attn-check 60 "$B" /tmp/g47/tandem-gpu-bench attn --layers 1
grep -E "^\||rror|panick" "$O/attn-check.md" | tail -12 | cut -c1-160; save
for r in 1 2; do
  date -u +%T; step "speed-main-$r" 40 "$M" /tmp/g46/tandem-gpu-bench attn --speed
  grep -E "^\| " "$O/speed-main-$r.md" | tail -4 | cut -c1-160
  date -u +%T; step "speed-heads-$r" 40 "$B" /tmp/g47/tandem-gpu-bench attn --speed
  grep -E "^\| " "$O/speed-heads-$r.md" | tail -4 | cut -c1-160; save
done
for r in 1 2; do
  for v in M R; do
    date -u +%T; step "kernels-$v-$r" 60 "${!v}" /tmp/g46/tandem-gpu-bench kernels --shape llama3-8b
    grep -E "^\| rope_kv" "$O/kernels-$v-$r.md"; save
  done
done
for r in 1 2; do
  date -u +%T; step "prefill-main-$r" 50 "$M" /tmp/g46/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (1024|8192|32768) \|" "$O/prefill-main-$r.md" | cut -c1-90
  date -u +%T; step "prefill-both-$r" 50 "$B" /tmp/g47/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (1024|8192|32768) \|" "$O/prefill-both-$r.md" | cut -c1-90; save
done
smi_stop
save
