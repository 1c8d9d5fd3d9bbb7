#!/usr/bin/env bash
# Device call 39 (nineteenth session, not run: the device time was spent; ~250 s, carry
# .gpu39; best on an H200, after call-32 and call-35): decode attention with the split's
# block-table entries staged in shared memory (docs/gpu-results/2026-12-06-nineteenth/decode-attn-table-smem.patch, dropped after it,
# kernels only). Call 35's profile of the b256 1k launch on an H100 put 21.8% of the stall
# samples on the first use of a block-table entry read from global memory, which each
# tile's copies wait for. The patch reads the split's entries into the merge area once per
# block (ptxas: still 168 registers for decode_attn_128_4, so 3 blocks a multiprocessor).
# 1. `kernels --decode-blocks 2048,1536`, main's kernels and the patch's taking turns twice:
#    decode_attn + attn_combine a layer and the 4-layer step at b256 1k and b64 4k.
# 2. Every GPU test with the patch's kernels (the decode attention against the CPU, bf16 and
#    fp8 caches, sliding windows among them).
# Carry .gpu39 (`WHICH=39 bash scripts/gpu-pending/prepare.sh`: this checkout's
# tandem-gpu-bench and engine-tests, xz, main/kernels and new/kernels). DEADLINE_S (290).
set -u
DEADLINE_S=${DEADLINE_S:-290}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c39
unxz_to /tmp/g39 .gpu39/tandem-gpu-bench.xz .gpu39/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c39.tgz" c39; }
for r in 1 2; do
  for v in main new; do
    date -u +%T; step "sweep-$v-$r" 40 "$PWD/.gpu39/$v/kernels" /tmp/g39/tandem-gpu-bench kernels \
      --shape llama3-8b --decode-blocks 2048,1536
    grep -E "^\| (1024|4096) " "$O/sweep-$v-$r.md"; save
  done
done
date -u +%T; step gpu-tests $(( DEADLINE_S - ($(date +%s) - t0) - 5 )) "$PWD/.gpu39/new/kernels" \
  /tmp/g39/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test .*(ok|FAILED)$|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
smi_stop
save
