#!/usr/bin/env bash
# Device call 18 (written in the thirteenth session; not yet run): issue 15's table
# on an H200 (name the kind `nvidia-h200`), whose figures are still the tenth
# session's. It runs main (.gpu27/main, with the residual epilogue and the tuned
# products, neither yet run on an H200) as the issue asks: every figure as median
# and range over 3 runs, taking turns with transformers SDPA.
# - Prefill: 3 `bench --only prefill` (each a median of 3 passes after a warm-up),
#   with SDPA between (`--runs 3`).
# - Decode: 3 `bench --only decode --batches 1,64,256` sweeps (each also takes
#   turns with the residual epilogue off and on, and the tuned products off and
#   on, at b64/b256), with the clocks and throttle reasons logged (the H200's b256
#   step read 17.5-17.9 ms against 16.2 extrapolated from 4 layers). A sweep takes
#   ~150 s on an H100; the third is skipped if it would pass DEADLINE_S.
# Carry .gpu27 (`WHICH=27 bash scripts/gpu-pending/prepare.sh`). ~580 s; run it with
# timeout_s 600. DEADLINE_S (default 580). G (default .gpu27) and TAG (default c18)
# let a later call run it on another folder's binaries (call-24.sh).
set -u
G=${G:-.gpu27} TAG=${TAG:-c18}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" "$TAG"
# BIN_XZ and KERN: another layout's binary and kernels (call-32: .gpu30 with k/U).
BIN_XZ=${BIN_XZ:-$G/main/tandem-gpu-bench.xz} KERN=${KERN:-$PWD/$G/main/kernels}
unxz_to /tmp/gm "$BIN_XZ"
env_line
smi_start
for r in 1 2 3; do
  date -u +%T.%N; step "prefill-$r" 45 "$KERN" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only prefill
  [ "$r" != 3 ] && { date -u +%T.%N; step "torch-$r" 60 "" /opt/torch/.venv/bin/python "$G/hf_reference.py" baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
for r in 1 2 3; do
  date -u +%T.%N; step "decode-$r" 150 "$KERN" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256
done
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch-*.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill|rror|panick" "$f"; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^Floor|^###|^\| (1024|4096) \| (1|64|256) \|" "$f"; done
tar -C "$OUT" -czf "$OUT/$TAG.tgz" "$TAG" && rm -rf "$O"
