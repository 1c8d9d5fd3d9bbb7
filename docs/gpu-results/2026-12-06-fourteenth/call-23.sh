#!/usr/bin/env bash
# Device call 23 (written in the fourteenth session; not yet run; after call-22 on
# the same warm machine, or alone): where the Hopper prefill attention's time goes.
# Issue 15's 32k target (SDPA ÷ ours ≥ 1.2; 1.11-1.14 in call 21) needs the last
# chunk's attention ~12% faster (≈490 TFLOP/s now; FlashAttention-3 reports ~600 on
# an H100). attn_ablations.py writes main's kernels with one part removed each
# (noload: no TMA boxes; nosoftmax: no online softmax; noexp: no ex2; nopingpong: the
# consumers do not take turns); their outputs are wrong, their times say what each
# part costs. For main and each: `kernels` (per-kernel times of an 8192-token chunk
# after 0 and after 24576 cached keys, 4 layers) and `attn --speed` (the 2-layer pass),
# at blocks of 64; main again at the end for drift. First, compute-sanitizer
# (the GPU machine's toolkit) on main's 128-key kernel, which it has not checked yet:
# memcheck of `attn --layers 1` at blocks of 64 and 16 (TMA boxes of whole blocks and
# a warp's lanes issuing them), synccheck at 64; each stops at its time limit.
# ~460 s (each kernels dir's first NVRTC compile ~35 s). Carry .gpu29 (main's
# tandem-gpu-bench). DEADLINE_S (default 580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c23
M=$PWD/.gpu29/main
unxz_to /tmp/gm .gpu29/main/tandem-gpu-bench.xz
python3 "$(dirname "$0")/attn_ablations.py" "$M/kernels" /tmp/abl
env_line
smi_start
CS=/usr/local/cuda/bin/compute-sanitizer
for t in memcheck:64 memcheck:16 synccheck:64; do
  date -u +%T.%N; step "sanitizer-${t%:*}-bs${t#*:}" 70 "$M/kernels" $CS --tool "${t%:*}" /tmp/gm/tandem-gpu-bench attn --layers 1 --block-size "${t#*:}"
  f="$O/sanitizer-${t%:*}-bs${t#*:}.md"
  grep -E "ERROR SUMMARY|^========= [A-Z]|^\| (1|77|1000|4097) \||worst" "$f" | head -12 | cut -c1-200
  echo "lines from the sanitizer: $(grep -c '^=========' "$f")"
done
show() { grep -E "^\| prefill_attn|^Kernel by kernel|^\| (8192|32768) \| [0-9.]+ \|" "$O/$1.md" | cut -c1-200; }
for v in main noload nosoftmax noexp nopingpong main; do
  k=/tmp/abl/$v; [ "$v" = main ] && k=$M/kernels
  n=$v; [ -e "$O/kernels-$n.md" ] && n=$v-again
  date -u +%T.%N; step "kernels-$n" 80 "$k" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b; show "kernels-$n"
  date -u +%T.%N; step "attn-$n" 40 "$k" /tmp/gm/tandem-gpu-bench attn --speed; show "attn-$n"
done
date -u +%T.%N
smi_stop
tar -C "$OUT" -czf "$OUT/c23.tgz" c23 && rm -rf "$O"
