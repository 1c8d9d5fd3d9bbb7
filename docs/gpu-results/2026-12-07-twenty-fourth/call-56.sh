#!/usr/bin/env bash
# Device call 56 (twenty-fourth session, the last ~330 s of device time; carry .gpu55): issue
# 15's table cut to one run each: `bench --only prefill`, transformers SDPA, one decode sweep.
set -u
DEADLINE_S=${DEADLINE_S:-230}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c56
KERN=$PWD/.gpu55/kernels
unxz_to /tmp/g56 .gpu55/tandem-gpu-bench.xz
save() { tar -C "$OUT" -czf "$OUT/c56.tgz" c56; }
env_line
step prefill 50 "$KERN" /tmp/g56/tandem-gpu-bench bench --shape llama3-8b --only prefill
grep -E "^\| (8192|32768) \|" "$O/prefill.md" | cut -c1-80; save
step torch 60 "" /opt/torch/.venv/bin/python .gpu55/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
grep -E "8192|32768" "$O/torch.md" | head -4; save
step decode 80 "$KERN" /tmp/g56/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256 --tables sampling
grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$O/decode.md" | cut -c1-120; save
