#!/usr/bin/env bash
# Device call 13 (thirteenth session): the warp-specialized prefill attention with
# 128-key tiles (scripts/gpu-pending/prefill-bk128.patch: m64n128 score products,
# 3 stages of 64 KiB for bf16 and 2 for fp8, registers 56 / 224 by setmaxnreg)
# against main (76b8069, 64-key tiles, 4 stages). `attn` checks it against the
# portable mma.sync kernel on 1..32k-token prompts (whole, chunked, from cached
# prefixes; TMA and copies) with a bf16 cache, an fp8 one, and blocks of 24 with
# a 3000-token window (the per-row lookup and the windowed path), then times
# each; then the 8B prefill with main and bk128 taking turns twice, transformers
# SDPA between; `kernels` of bk128 last (attention per layer).
# Carry .gpu24 (see scripts/gpu-pending/prepare.sh). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c13
B=$PWD/.gpu24/base N=$PWD/.gpu24/bk128
unxz_to /tmp/gb .gpu24/base/tandem-gpu-bench.xz
unxz_to /tmp/gn .gpu24/bk128/tandem-gpu-bench.xz
env_line
smi_start
date -u +%T.%N; step attn 150 "$N/kernels" /tmp/gn/tandem-gpu-bench attn
grep -E "^\| (1|1000|8192|32768) \||worst|rror|panick" "$O/attn.md" | cut -c1-240
date -u +%T.%N; step attn-fp8 120 "$N/kernels" /tmp/gn/tandem-gpu-bench attn --kv-dtype fp8_e4m3
grep -E "^\| (8192|32768) \||worst|rror|panick" "$O/attn-fp8.md" | cut -c1-240
date -u +%T.%N; step attn-bs24-w3000 100 "$N/kernels" /tmp/gn/tandem-gpu-bench attn --block-size 24 --window 3000
grep -E "^\| (8192|32768) \||worst|rror|panick" "$O/attn-bs24-w3000.md" | cut -c1-240
for round in 1 2; do
  date -u +%T.%N; step "prefill-base-$round" 45 "$B/kernels" /tmp/gb/tandem-gpu-bench bench --shape llama3-8b --only prefill
  date -u +%T.%N; step "prefill-bk128-$round" 45 "$N/kernels" /tmp/gn/tandem-gpu-bench bench --shape llama3-8b --only prefill
  [ "$round" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python .gpu24/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
date -u +%T.%N; step kernels-bk128 60 "$N/kernels" /tmp/gn/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
grep -E "^Kernel by kernel, a prefill|^\| prefill_attn" "$O/kernels-bk128.md"
tar -C "$OUT" -czf "$OUT/c13.tgz" c13 && rm -rf "$O"
