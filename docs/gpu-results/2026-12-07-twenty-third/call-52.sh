#!/usr/bin/env bash
# Device call 52 (twenty-third session, right after 51 and 50 on the same warm H100; carry
# .gpu46-.gpu48): the two prefill patches against main, more rounds (taking turns), the
# Hopper prefill attention checked against the portable one with both, and rope_kv alone.
set -u
DEADLINE_S=${DEADLINE_S:-300}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c52
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz
unxz_to /tmp/g48 .gpu48/tandem-gpu-bench.xz
M=$PWD/.gpu46/kernels B=$PWD/.gpu47/kernels-both R=$PWD/.gpu47/kernels-rope
save() { tar -C "$OUT" -czf "$OUT/c52.tgz" c52; }
date -u +%T; step attn-check 60 "$B" /tmp/g47/tandem-gpu-bench attn --layers 1
grep -E "^\||rror|panick" "$O/attn-check.md" | tail -8 | cut -c1-160; save
for r in 3 4 5; do
  for v in main both; do
    if [ $v = main ]; then k=$M b=/tmp/g48/tandem-gpu-bench; else k=$B b=/tmp/g47/tandem-gpu-bench; fi
    date -u +%T; step "prefill-$v-$r" 40 "$k" "$b" bench --shape llama3-8b --only prefill --quick
    grep -E "^\| (1024|8192) \|" "$O/prefill-$v-$r.md" | cut -c1-80; save
  done
done
for v in M R; do
  date -u +%T; step "kernels-$v" 60 "${!v}" /tmp/g48/tandem-gpu-bench kernels --shape llama3-8b
  grep -E "^\| rope_kv|^\| prefill_attn" "$O/kernels-$v.md"; save
done
