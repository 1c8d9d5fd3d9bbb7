#!/usr/bin/env bash
# Device call 10 (twelfth session), straight after call-9.sh on the same warm machine:
# the 8B prefill (its last column with cuBLAS's own products) against transformers
# SDPA on the same card, then a second decode run.
# Carry .gpu22 (`WHICH=22 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c10
K=$PWD/.gpu22/kernels
unxz_to /tmp/g22 .gpu22/tandem-gpu-bench.xz
env_line
smi_start
date -u +%T.%N; step torch 130 "" /opt/torch/.venv/bin/python .gpu22/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
date -u +%T.%N; step prefill-2 100 "$K" /tmp/g22/tandem-gpu-bench bench --shape llama3-8b --only prefill
date -u +%T.%N; step decode-2 140 "$K" /tmp/g22/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$f"; grep -A8 -E "^### products with tuned" "$f" | grep -E "^\| [0-9]"; done
tar -C "$OUT" -czf "$OUT/c10.tgz" c10 && rm -rf "$O"
