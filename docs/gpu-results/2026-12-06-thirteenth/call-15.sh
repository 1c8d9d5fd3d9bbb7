#!/usr/bin/env bash
# Device call 15 (thirteenth session; run as one command line on call 14's warm
# machine): the speed of main's prefill attention (.gpu24/base: 64-key tiles) and
# of 128-key tiles with one thread issuing the TMA boxes (.gpu24/bk128) with cache
# blocks of 64 and 128 (call 14 had found the same 128-key kernel 30.3 ms with
# blocks of 16 and 25.0 with blocks of 128). Carry .gpu24.
source docs/gpu-results/2026-12-05-eighth/common.sh c15
B=$PWD/.gpu24/base K=$PWD/.gpu24/bk128
unxz_to /tmp/gb .gpu24/base/tandem-gpu-bench.xz
unxz_to /tmp/gk .gpu24/bk128/tandem-gpu-bench.xz
env_line
for bs in 64 128; do
  step attn-main-bs$bs 60 "$B/kernels" /tmp/gb/tandem-gpu-bench attn --speed --block-size $bs
  step attn-bk128-bs$bs 60 "$K/kernels" /tmp/gk/tandem-gpu-bench attn --speed --block-size $bs
done
for f in $O/attn-*.md; do echo "== $f"; grep -E "^\| (8192|32768) \| [0-9.]+ \||rror|panick" $f; done
tar -C "$OUT" -czf "$OUT/c15.tgz" c15
