#!/usr/bin/env bash
# Device call 29 (sixteenth session; ~220 s, kind nvidia-h200, carry .gpu30 with k/U): issue
# 15's prefill figures with the uniform wgmma descriptors (7e67fc5; .gpu30's binary with
# k/U, this checkout's kernels): three runs of the 8B prefill with transformers SDPA
# between the first two and the last two. Decode is untouched by that change (the prefill
# attention only), so the decode figures stand as measured.
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c29
G=$PWD/.gpu30
unxz_to /tmp/gm .gpu30/tandem-gpu-bench.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c29.tgz" c29; }
for r in 1 2 3; do
  date -u +%T.%N; step "prefill-$r" 45 "$G/k/U" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (1024|8192|32768) \| [0-9.]+ \|" "$O/prefill-$r.md"; save
  [ "$r" != 3 ] && { date -u +%T.%N; step "torch-$r" 60 "" /opt/torch/.venv/bin/python "$G/hf_reference.py" baseline --prefill 8192,32768 --runs 3 --decode ""; grep -E "^\| prefill" "$O/torch-$r.md"; save; }
done
date -u +%T.%N
smi_stop
save
