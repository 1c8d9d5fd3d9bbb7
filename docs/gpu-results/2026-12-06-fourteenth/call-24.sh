#!/usr/bin/env bash
# Device call 24 (written in the fourteenth session; not yet run): issue 15's table
# on an H200, whose figures are still the tenth session's (call 18 asked for one and
# ran on the H100 already held: make this a session's FIRST call, kind `nvidia-h200`).
# It runs main (.gpu29/main: the 128-key tiles, blocks of 64, the residual epilogue
# and the tuned products, none yet run on an H200) as the issue asks: every figure as
# median and range over 3 runs, taking turns with transformers SDPA.
# - Prefill: 3 `bench --only prefill` (each a median of 3 passes after a warm-up),
#   with SDPA between (`--runs 3`).
# - Decode: 3 `bench --only decode --batches 1,64,256` sweeps (each also takes
#   turns with the residual epilogue off and on, and the tuned products off and
#   on, at b64/b256), with the clocks and throttle reasons logged (the H200's b256
#   step read 17.5-17.9 ms against 16.2 extrapolated from 4 layers). A sweep takes
#   ~150 s on an H100; the third is skipped if it would pass DEADLINE_S.
# Carry .gpu29 (`WHICH=29 bash scripts/gpu-pending/prepare.sh`). ~580 s; run it with
# timeout_s 600. DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c24
M=$PWD/.gpu29/main
unxz_to /tmp/gm .gpu29/main/tandem-gpu-bench.xz
env_line
smi_start
for r in 1 2 3; do
  date -u +%T.%N; step "prefill-$r" 45 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only prefill
  [ "$r" != 3 ] && { date -u +%T.%N; step "torch-$r" 60 "" /opt/torch/.venv/bin/python .gpu29/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
for r in 1 2 3; do
  date -u +%T.%N; step "decode-$r" 150 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
done
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch-*.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill|rror|panick" "$f"; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^###|^\| (1024|4096) \| (1|64|256) \|" "$f"; done
tar -C "$OUT" -czf "$OUT/c24.tgz" c24 && rm -rf "$O"
