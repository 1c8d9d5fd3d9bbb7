#!/usr/bin/env bash
# Device call 42 (twenty-first session; ~420 s, carry .gpu41 and .gpu42): call 41's kernel
# patch and a new host + kernel change, checked and timed together.
# - decode-tile-one-block.patch (call 41's, kernels only): decode attention's tile loads read
#   the block-table entry and divide the key once per 16-key tile instead of once per row
#   (call 35's profile had the b256 launch bound by its integer work).
# - The next product's weights asked of L2 ahead (`launch::Ahead`, kernels/gemv.cu
#   `ahead_l2`): at batch 1 each `gemv` launch, once its blocks' rows are read, issues
#   `cp.async.bulk.prefetch.L2` for the next product's weights (qkv -> o whole, o -> the
#   first rows of gate and up, down -> the next layer's qkv or the lm_head), so HBM streams
#   them during the short kernels between (RoPE, attention, combine, the norms), where it
#   is otherwise idle. The eleventh session's side-stream kernel did this for o alone on an
#   H100 (+0.8% at 4k, -0.35% at 1k); this costs no kernel and no SM time. Off by default
#   (`TANDEM_CUDA_PREFETCH_AHEAD`, bytes); `bench --tables ahead` times budgets 0-48 MiB.
# 1. Every GPU test with the ahead build and the tile patch's kernels (the check decodes
#    alone with and without ahead prefetches and with one split a sequence, against the CPU).
# 2. `kernels --decode-blocks 4096` with main's kernels and the tile patch's (call 41's
#    binary), taking turns: decode_attn + combine and the 4-layer step at b256 1k, b64 4k.
# 3. `bench --only decode --batches 1,64,256 --tables ahead`: the ahead build with its kernels,
#    then with the tile patch's (b64/b256 steps: the tile patch in the full model; b1: the
#    ahead table, 3 rounds of 6 budgets at 1k and 4k).
# 4. If time is left, call 41's b1/b8 split map (2-32 splits, main's kernels).
# Carry .gpu41 (call 41's) and .gpu42 (this checkout's tandem-gpu-bench and engine-tests, xz;
# kernels/ and kernels-tile/). DEADLINE_S (450).
set -u
DEADLINE_S=${DEADLINE_S:-450}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c42
unxz_to /tmp/g41 .gpu41/tandem-gpu-bench.xz
unxz_to /tmp/g42 .gpu42/tandem-gpu-bench.xz .gpu42/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c42.tgz" c42; }
date -u +%T; step gpu-tests 150 "$PWD/.gpu42/kernels-tile" /tmp/g42/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test .*(ok|FAILED)$|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
for v in main new; do
  date -u +%T; step "sweep-$v" 40 "$PWD/.gpu41/$v/kernels" /tmp/g41/tandem-gpu-bench kernels \
    --shape llama3-8b --decode-blocks 4096
  grep -E "^\| (1024|4096) " "$O/sweep-$v.md"; save
done
for v in kernels kernels-tile; do
  date -u +%T; step "decode-$v" 110 "$PWD/.gpu42/$v" /tmp/g42/tandem-gpu-bench bench \
    --shape llama3-8b --only decode --batches 1,64,256 --tables ahead
  grep -E "^###|^\| (1024|4096) \| " "$O/decode-$v.md" | cut -c1-200; save
done
date -u +%T; step split-map-small 40 "$PWD/.gpu41/main/kernels" /tmp/g41/tandem-gpu-bench kernels \
  --shape llama3-8b --decode-shapes 1024:1,4096:1,4096:8 --decode-splits 2,4,8,16,32
grep -E "^\| (1024|4096) " "$O/split-map-small.md" | awk -F'|' '$5 ~ / 1 /' | cut -c1-120
smi_stop
save
