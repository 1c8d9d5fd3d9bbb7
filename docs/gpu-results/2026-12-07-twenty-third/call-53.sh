#!/usr/bin/env bash
# Device call 53 (twenty-third session, after 52 on the same warm H100; carry .gpu46-.gpu48):
# `attn --speed` (the prefill attention alone), main's grid against prefill-heads-fastest's
# (the both-patches build), taking turns.
set -u
DEADLINE_S=${DEADLINE_S:-200}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c53
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz
unxz_to /tmp/g48 .gpu48/tandem-gpu-bench.xz
M=$PWD/.gpu46/kernels B=$PWD/.gpu47/kernels-both
save() { tar -C "$OUT" -czf "$OUT/c53.tgz" c53; }
for r in 1 2; do
  date -u +%T; step "speed-main-$r" 45 "$M" /tmp/g48/tandem-gpu-bench attn --speed
  grep -E "^\| " "$O/speed-main-$r.md" | tail -5 | cut -c1-150
  date -u +%T; step "speed-heads-$r" 45 "$B" /tmp/g47/tandem-gpu-bench attn --speed
  grep -E "^\| " "$O/speed-heads-$r.md" | tail -5 | cut -c1-150; save
done
