#!/usr/bin/env bash
# Device call 55 (written in the twenty-third session, not run yet; ~450 s on an H200, carry
# .gpu55: `WHICH=55 bash scripts/gpu-pending/prepare.sh`): issue 15's table with main as it is
# now (a3fc187: rope_kv in 16-byte items since call 43), as call 43 measured it: three
# `bench --only prefill` runs with transformers SDPA between them, three decode sweeps at b1,
# b64, b256, then main's 32k prompt in one pass and every GPU test if time is left.
# DEADLINE_S (560); C55 the carried folder (.gpu55; call 72 passes .gpu72, built from 2efd84e,
# whose kernels and bench are a3fc187's).
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c55
C55=${C55:-.gpu55}
KERN=$PWD/$C55/kernels
unxz_to /tmp/g55 $C55/tandem-gpu-bench.xz $C55/engine-tests.xz
save() { tar -C "$OUT" -czf "$OUT/c55.tgz" c55; }
env_line
smi_start
for r in 1 2 3; do
  date -u +%T; step "prefill-$r" 50 "$KERN" /tmp/g55/tandem-gpu-bench bench --shape llama3-8b --only prefill
  grep -E "^\| (8192|32768) \|" "$O/prefill-$r.md" | cut -c1-80
  [ "$r" != 3 ] && { date -u +%T; step "torch-$r" 60 "" /opt/torch/.venv/bin/python $C55/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; grep -E "8192|32768" "$O/torch-$r.md" | head -4; }
  save
done
for r in 1 2 3; do
  date -u +%T; step "decode-$r" 80 "$KERN" /tmp/g55/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256 --tables sampling
  grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$O/decode-$r.md" | cut -c1-120; save
done
date -u +%T; step onepass 60 "$KERN" /tmp/g55/tandem-gpu-bench bench --shape llama3-8b --only prefill --prefill-chunk 32768
grep -E "^\| (8192|32768) \|" "$O/onepass.md" | cut -c1-80
smi_stop
date -u +%T; step gpu-tests 150 "$KERN" /tmp/g55/engine-tests --ignored cuda:: --test-threads 1
grep -E "FAILED|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200
save
