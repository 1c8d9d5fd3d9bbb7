#!/usr/bin/env bash
# Device call 17 (written in the thirteenth session; not yet run; call-19.sh goes
# straight after it on the same warm machine). Two pending prefill-attention
# patches, on the whole 8B prefill rather than `attn`'s 2-layer pass:
# - prefill-bk128-lanes.patch (bk128/: 128-key tiles, TMA boxes issued by a warp,
#   TMA for cache blocks of 128). Call 16 (blocks of 16) found it equal to main at
#   32k (1320.8/1318.3 against 1320.9 ms) and 2% behind at 8k (222.4/227.3 against
#   218.0/222.4). Call 15 found its 32k chunk 3.5% ahead with blocks of 64 (25.45
#   against 26.36 ms, 2 layers). lanes64/ is its warp-issued boxes with main's
#   64-key tiles, under main's binary.
# - prefill-tma-nofence.patch (nofence/: kernels only, under main's binary): the
#   consumers skip fence.proxy.async for tiles that came by TMA (async proxy
#   already). `attn` checks it first.
# Then main, bk128, lanes64 and nofence take turns twice at blocks of 16, and main
# and bk128 at blocks of 64 (`bench --block-size`), with transformers SDPA once.
# `kernels` of main (blocks of 16 and 64) and bk128 come last. ~330 s.
# Carry .gpu27 (`WHICH=27 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c17
M=$PWD/.gpu27/main K=$PWD/.gpu27/bk128 L=$PWD/.gpu27/lanes64 F=$PWD/.gpu27/nofence
unxz_to /tmp/gm .gpu27/main/tandem-gpu-bench.xz
unxz_to /tmp/gk .gpu27/bk128/tandem-gpu-bench.xz
env_line
smi_start
show() { grep -E "^\| (8192|32768) \| [0-9.]+ \||worst|rror|panick" "$O/$1.md" | cut -c1-200; }
date -u +%T.%N; step attn-nofence 60 "$F/kernels" /tmp/gm/tandem-gpu-bench attn; show attn-nofence
for round in 1 2; do
  for v in main:gm:$M bk128:gk:$K lanes64:gm:$L nofence:gm:$F; do
    IFS=: read -r name bin dir <<< "$v"
    date -u +%T.%N; step "prefill-$name-bs16-$round" 45 "$dir/kernels" "/tmp/$bin/tandem-gpu-bench" bench --shape llama3-8b --only prefill --block-size 16
  done
  for v in main:gm:$M bk128:gk:$K; do
    IFS=: read -r name bin dir <<< "$v"
    date -u +%T.%N; step "prefill-$name-bs64-$round" 45 "$dir/kernels" "/tmp/$bin/tandem-gpu-bench" bench --shape llama3-8b --only prefill --block-size 64
  done
  [ "$round" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python .gpu27/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""; }
done
date -u +%T.%N; step kernels-main 60 "$M/kernels" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N; step kernels-main-bs64 60 "$M/kernels" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b --block-size 64
date -u +%T.%N; step kernels-bk128 60 "$K/kernels" /tmp/gk/tandem-gpu-bench kernels --shape llama3-8b
date -u +%T.%N
smi_stop
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill|rror|panick" "$f"; done
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^Kernel by kernel, a prefill|^\| prefill_attn" "$f"; done
tar -C "$OUT" -czf "$OUT/c17.tgz" c17 && rm -rf "$O"
