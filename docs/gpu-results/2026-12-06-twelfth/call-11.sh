#!/usr/bin/env bash
# Device call 11 (twelfth session; written when its device time ran out, not yet run).
# scripts/gpu-pending/silu-unrolled.patch: SiLU·up over the rows' values as one flat
# range, four 8-value vectors a thread with all their loads issued before any is used
# (call 9's prefill profile put the gate_up product and SiLU·up at 3046 µs a layer for
# an 8192-token chunk on an H100, the product alone ~2497: SiLU·up moved 705 MB at
# ~1.3 TB/s or less).
#   - every GPU test with the patch;
#   - `kernels`, main then patched: the prefill profiles now time "gate_up product" and
#     "SiLU" apart (b64/b256 too);
#   - the 8B prefill, main and patched taking turns twice, transformers SDPA between;
#   - main's decode sweep at b1/b64/b256 with clocks logged (on an H200: whether its b256
#     step, 17.5-17.9 ms against 16.2 extrapolated from 4 layers, is power-capped).
# Carry .gpu23 (`WHICH=23 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c11
M=$PWD/.gpu23/main S=$PWD/.gpu23/silu
unxz_to /tmp/gm .gpu23/main/tandem-gpu-bench.xz
unxz_to /tmp/gs .gpu23/silu/tandem-gpu-bench.xz .gpu23/silu/engine-tests.xz
env_line
smi_start
date -u +%T.%N; step gpu-tests 160 "$S/kernels" /tmp/gs/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
date -u +%T.%N; step kernels-main 70 "$M/kernels" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-silu 70 "$S/kernels" /tmp/gs/tandem-gpu-bench kernels --shape llama3-8b
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^Kernel by kernel, a prefill|^\| (gate_up product|SiLU) \|" "$f"; done
date -u +%T.%N; step prefill-main-1 40 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only prefill
date -u +%T.%N; step prefill-silu-1 40 "$S/kernels" /tmp/gs/tandem-gpu-bench bench --shape llama3-8b --only prefill
date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python .gpu23/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
date -u +%T.%N; step prefill-main-2 40 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only prefill
date -u +%T.%N; step prefill-silu-2 40 "$S/kernels" /tmp/gs/tandem-gpu-bench bench --shape llama3-8b --only prefill
date -u +%T.%N; step decode 140 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$O/decode.md"
tar -C "$OUT" -czf "$OUT/c11.tgz" c11 && rm -rf "$O"
