#!/usr/bin/env bash
# Device call 48 (twenty-second session; ~400 s, an H200 preferred; carry .gpu46 for main's
# kernels and .gpu48 = main's tandem-gpu-bench with `bench --prefill-chunk`, xz).
# 1. The 32k prompt in one pass against chunks of 8192, twice each, with transformers SDPA
#    (one pass of 32k, as always) between: `bench --only prefill` and the same with
#    `--prefill-chunk 32768`. Call 44 had an 8k first chunk's attention at 526 TFLOP/s and a
#    32k last chunk's at 602: one 32k pass has no short first chunks. Issue 15's SDPA ratio
#    (target 1.2) is 1.15 at 32k with chunks of 8192 (call 43).
# 2. The fp8 cache's decode (its kernels went from 172 to 190 registers with the tile's one
#    block-table read, twenty-first session), bf16 then fp8, b1 and b64 at 1k and 4k.
# DEADLINE_S (560).
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c48
K=$PWD/.gpu46/kernels
unxz_to /tmp/g48 .gpu48/tandem-gpu-bench.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c48.tgz" c48; }
for r in 1 2; do
  date -u +%T; step "prefill-8k-$r" 50 "$K" /tmp/g48/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (8192|32768) \|" "$O/prefill-8k-$r.md" | cut -c1-90
  date -u +%T; step "prefill-32k-$r" 60 "$K" /tmp/g48/tandem-gpu-bench bench --shape llama3-8b --only prefill \
    --prefill-chunk 32768
  grep -E "^\| (8192|32768) \|" "$O/prefill-32k-$r.md" | cut -c1-90; save
  [ "$r" = 1 ] && { date -u +%T; step torch 70 "" /opt/torch/.venv/bin/python scripts/hf_reference.py \
    baseline --prefill 8192,32768 --runs 3 --decode ""; grep -E "8192|32768" "$O/torch.md" | head -4; save; }
done
for d in bf16 fp8_e4m3; do
  date -u +%T; step "decode-$d" 70 "$K" /tmp/g48/tandem-gpu-bench bench --shape llama3-8b --only decode \
    --batches 1,64 --kv-dtype "$d" --tables sampling
  grep -E "^Floor|^KV|^\| (1024|4096) \| " "$O/decode-$d.md" | cut -c1-200; save
done
smi_stop
save
