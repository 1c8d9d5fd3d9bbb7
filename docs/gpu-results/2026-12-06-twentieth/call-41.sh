#!/usr/bin/env bash
# Device call 41 (twentieth session; ~350 s, carry .gpu41): the four-wave rule for decode
# attention (DECODE_WAVES, engine/src/cuda/mod.rs) and the tile's block-table entry read once
# (paged_kv_tile, kernels/decode_attn.cu), checked and timed. Call 35's profile on the H200
# had the b256 launch bound by its integer work (stalls: wait 31.6%, selected 18.1%, long
# scoreboard 13.8%; DRAM 82.6% of peak, 3.98 TB/s): every row of every tile divided its key
# by the block size and read its block-table entry.
# 1. `kernels --decode-blocks 4096`: decode_attn + attn_combine and the 4-layer step at b256
#    1k and b64 4k, the rule (now four waves) against 4096 blocks (the old rule), with main's
#    kernels (main/) and the new ones (new/) taking turns twice.
# 2. Every GPU test with the new kernels; the check now also compares the first batched
#    decode step with one split per sequence (b128-b256's path under the rule) to the CPU.
# 3. The split map (main's kernels): `kernels --decode-splits 1,2,3,4,6` at b32, b64, b128
#    and b256 1k and b32, b128 4k: the 4-layer attention and step at each split count a
#    sequence, against the rule. Call 35's H200 sweep showed wave quantization (b64 4k: 3.88
#    waves 264-266 µs a layer, 5.17 waves 284-291); this is the figure a rule that weighs
#    the last wave's fill would be built from. Then the same at b1 (1k, 4k) and b8 4k with
#    2-32 splits: the one-wave rule gives b1 16 splits of 64 keys at 1k (one tile a warp),
#    and its attention and merge are latency, ~17 µs a layer in events on the H200 for 4 MB.
#    Then batches with one 32k sequence among 63 of 4k and 255 of 1k, the rule against
#    4096 blocks: fewer splits give the long sequence longer blocks (the rule's risk).
# 4. `bench --only decode --batches 1,64,256` with the new kernels, if time is left.
# Carry .gpu41 (this checkout's tandem-gpu-bench and engine-tests, xz; main/kernels and
# new/kernels). DEADLINE_S (420).
set -u
DEADLINE_S=${DEADLINE_S:-420}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c41
unxz_to /tmp/g41 .gpu41/tandem-gpu-bench.xz .gpu41/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c41.tgz" c41; }
for r in 1 2; do
  for v in main new; do
    date -u +%T; step "sweep-$v-$r" 40 "$PWD/.gpu41/$v/kernels" /tmp/g41/tandem-gpu-bench kernels \
      --shape llama3-8b --decode-blocks 4096
    grep -E "^\| (1024|4096) " "$O/sweep-$v-$r.md"; save
  done
done
date -u +%T; step gpu-tests 150 "$PWD/.gpu41/new/kernels" /tmp/g41/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test .*(ok|FAILED)$|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
date -u +%T; step split-map 90 "$PWD/.gpu41/main/kernels" /tmp/g41/tandem-gpu-bench kernels \
  --shape llama3-8b --decode-shapes 1024:32,1024:64,1024:128,1024:256,4096:32,4096:128 \
  --decode-splits 1,2,3,4,6
grep -E "^\| (1024|4096) " "$O/split-map.md" | awk -F'|' '$5 ~ / 1 /' | cut -c1-120; save
date -u +%T; step split-map-small 40 "$PWD/.gpu41/main/kernels" /tmp/g41/tandem-gpu-bench kernels \
  --shape llama3-8b --decode-shapes 1024:1,4096:1,4096:8 --decode-splits 2,4,8,16,32
grep -E "^\| (1024|4096) " "$O/split-map-small.md" | awk -F'|' '$5 ~ / 1 /' | cut -c1-120; save
date -u +%T; step outlier 60 "$PWD/.gpu41/main/kernels" /tmp/g41/tandem-gpu-bench kernels \
  --shape llama3-8b --decode-shapes 4096:63+32768:1,1024:255+32768:1 --decode-blocks 4096
grep -E "^\| (1024|4096)" "$O/outlier.md" | cut -c1-140; save
date -u +%T; step decode $(( DEADLINE_S - ($(date +%s) - t0) - 5 )) "$PWD/.gpu41/new/kernels" \
  /tmp/g41/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
grep -E "^DRAM|^###|^\| (1024|4096) \| " "$O/decode.md" | cut -c1-200
smi_stop
save
