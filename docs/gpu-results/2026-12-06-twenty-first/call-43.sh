#!/usr/bin/env bash
# Device call 43 (twenty-first session; ~400 s on an H200, carry .gpu30 and .gpu42): issue 15's
# table with decode-tile-one-block.patch's kernels (call 42: b256 1k step 16.20 -> 15.26 ms):
# three `bench --only prefill` runs with transformers SDPA between them, then three decode
# sweeps at b1, b64, b256 (`--tables sampling`: the sweep and the sampling check only).
# .gpu42's binary is 30b2ea6 (the ahead prefetch off by default, so main's behaviour);
# .gpu30 brings scripts/hf_reference.py. DEADLINE_S (560).
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c43
KERN=$PWD/.gpu42/kernels-tile
unxz_to /tmp/gm .gpu42/tandem-gpu-bench.xz
env_line
smi_start
for r in 1 2 3; do
  date -u +%T; step "prefill-$r" 50 "$KERN" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (8192|32768) \|" "$O/prefill-$r.md" | cut -c1-80
  [ "$r" != 3 ] && { date -u +%T; step "torch-$r" 60 "" /opt/torch/.venv/bin/python .gpu30/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; grep -E "8192|32768" "$O/torch-$r.md" | head -4; }
done
for r in 1 2 3; do
  date -u +%T; step "decode-$r" 80 "$KERN" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256 --tables sampling
  grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$O/decode-$r.md" | cut -c1-120
done
date -u +%T
smi_stop
tar -C "$OUT" -czf "$OUT/c43.tgz" c43
