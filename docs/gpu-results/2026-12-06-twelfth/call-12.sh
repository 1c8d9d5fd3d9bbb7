#!/usr/bin/env bash
# Device call 12 (twelfth session; not yet run), straight after call-11.sh on the same
# warm machine: the 8B prefill with main and each patch (silu-unrolled, residual-epilogue)
# taking turns twice, transformers SDPA between; then main's decode at b1/b64/b256 with
# clocks logged (on an H200: whether its b256 step, 17.5-17.9 ms against 16.2 extrapolated
# from 4 layers, is power-capped).
# Carry .gpu23 (`WHICH=23 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c12
M=$PWD/.gpu23/main S=$PWD/.gpu23/silu R=$PWD/.gpu23/resid
unxz_to /tmp/gm .gpu23/main/tandem-gpu-bench.xz
unxz_to /tmp/gs .gpu23/silu/tandem-gpu-bench.xz
unxz_to /tmp/gr .gpu23/resid/tandem-gpu-bench.xz
env_line
smi_start
for round in 1 2; do
  for v in main:gm:$M silu:gs:$S resid:gr:$R; do
    IFS=: read -r name bin dir <<< "$v"
    date -u +%T.%N; step "prefill-$name-$round" 45 "$dir/kernels" "/tmp/$bin/tandem-gpu-bench" bench --shape llama3-8b --only prefill
  done
  [ "$round" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python .gpu23/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
date -u +%T.%N; step decode 150 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
grep -E "^Floor|^\| (1024|4096) \| (1|64|256) \|" "$O/decode.md"
tar -C "$OUT" -czf "$OUT/c12.tgz" c12 && rm -rf "$O"
