#!/usr/bin/env bash
# Device call 54 (twenty-third session, after 53 on the same warm H100; carry .gpu46-.gpu48):
# `bench --only prefill` (1k, 8k, 32k) main against both prefill patches, two more rounds.
set -u
DEADLINE_S=${DEADLINE_S:-150}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c54
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz
unxz_to /tmp/g48 .gpu48/tandem-gpu-bench.xz
M=$PWD/.gpu46/kernels B=$PWD/.gpu47/kernels-both
save() { tar -C "$OUT" -czf "$OUT/c54.tgz" c54; }
for r in 6 7; do
  date -u +%T; step "prefill-both-$r" 35 "$B" /tmp/g47/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (1024|8192|32768) \|" "$O/prefill-both-$r.md" | cut -c1-80; save
  date -u +%T; step "prefill-main-$r" 35 "$M" /tmp/g48/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (1024|8192|32768) \|" "$O/prefill-main-$r.md" | cut -c1-80; save
done
