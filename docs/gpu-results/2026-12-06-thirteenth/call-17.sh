#!/usr/bin/env bash
# Device call 17 (written in the thirteenth session; not yet run): whether the
# pending prefill-bk128-lanes.patch (128-key tiles, TMA boxes issued by a warp,
# TMA for cache blocks of 128) should land, on the whole 8B prefill rather than
# `attn`'s 2-layer pass. Call 16 (blocks of 16) found it equal to main at 32k
# (1320.8/1318.3 against 1320.9 ms) and 2% behind at 8k (222.4/227.3 against
# 218.0/222.4); call 13's profile put its first 8k chunk's attention 12% behind
# main's (1633 against 1457 µs a layer, other machines); call 15 found its 32k
# chunk 3.5% ahead with blocks of 64 (25.45 against 26.36 ms, 2 layers). Here:
# main, bk128 and lanes64 (the patch's warp-issued boxes with main's 64-key
# tiles) taking turns twice at blocks of 16 and of 64 (`bench --block-size`),
# transformers SDPA once, main's decode at b1 and b64 with blocks of 16 and 64
# (with the residual epilogue off and on, taking turns, at b64 and b256),
# then `kernels` of main (blocks of 16 and 64) and bk128. ~470 s.
# Carry .gpu27 (`WHICH=27 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c17
M=$PWD/.gpu27/main K=$PWD/.gpu27/bk128 L=$PWD/.gpu27/lanes64
unxz_to /tmp/gm .gpu27/main/tandem-gpu-bench.xz
unxz_to /tmp/gk .gpu27/bk128/tandem-gpu-bench.xz
env_line
smi_start
for round in 1 2; do
  for bs in 16 64; do
    for v in main:gm:$M bk128:gk:$K lanes64:gm:$L; do
      IFS=: read -r name bin dir <<< "$v"
      date -u +%T.%N; step "prefill-$name-bs$bs-$round" 45 "$dir/kernels" "/tmp/$bin/tandem-gpu-bench" bench --shape llama3-8b --only prefill --block-size $bs
    done
  done
  [ "$round" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python .gpu27/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
# Main's decode at blocks of 16 and 64 (a node's block size serves both phases);
# each also takes turns with the residual epilogue off and on at b64 and b256
# (the twelfth session's open b256 question).
for bs in 16 64; do
  date -u +%T.%N; step "decode-main-bs$bs" 150 "$M/kernels" /tmp/gm/tandem-gpu-bench bench --shape llama3-8b --only decode --batches 1,64 --block-size $bs
done
date -u +%T.%N; step kernels-main 60 "$M/kernels" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-main-bs64 60 "$M/kernels" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b --block-size 64
date -u +%T.%N; step kernels-bk128 60 "$K/kernels" /tmp/gk/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill|rror|panick" "$f"; done
grep -E "^Floor|^###|^\| (1024|4096) \| (1|64|256) \|" "$O"/decode-main-bs*.md
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^Kernel by kernel, a prefill|^\| prefill_attn" "$f"; done
tar -C "$OUT" -czf "$OUT/c17.tgz" c17 && rm -rf "$O"
