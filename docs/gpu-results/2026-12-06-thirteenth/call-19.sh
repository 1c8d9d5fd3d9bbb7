#!/usr/bin/env bash
# Device call 19 (written in the thirteenth session; not yet run), straight after
# call-17.sh on the same warm machine: main's decode at blocks of 16 and 64 (a
# node's block size serves both phases; call 17 times the prefill). Each run also
# takes turns with the residual epilogue off and on at b64 and b256 (the open
# question from the twelfth session: `kernels`' 4-layer b256 graph replay read
# 3.101 ms with it against 3.044 without, one sample each), and with the tuned
# products off and on. ~300 s. Carry .gpu27. DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c19
M=$PWD/.gpu27/main
unxz_to /tmp/gm .gpu27/main/tandem-gpu-bench.xz
env_line
smi_start
for bs in 16 64; do
  date -u +%T.%N; step "decode-main-bs$bs" 150 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64,256 --block-size $bs
done
date -u +%T.%N
smi_stop
grep -E "^Floor|^###|^\| (1024|4096) \| (1|64|256) \|" "$O"/decode-main-bs*.md
tar -C "$OUT" -czf "$OUT/c19.tgz" c19 && rm -rf "$O"
