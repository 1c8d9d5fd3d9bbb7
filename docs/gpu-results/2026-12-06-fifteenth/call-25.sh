#!/usr/bin/env bash
# Device call 25 (written in the fifteenth session, whose device time ran out before it
# could run; ~560 s, kind nvidia-h200, timeout_s 600): the Hopper prefill attention with
# its wait for P V kept behind the softmax (scripts/gpu-pending/).
# ptxas 13.0 placed the loop's wait for P V (WARPGROUP.DEPBAR.LE gsb0, 0x0) right
# after the first shuffle of the softmax, ahead of all 64 ex2s of the tile (SASS of the
# NVRTC PTX, read with cuobjdump): each consumer's softmax waited out its own P V
# instead of running under it. Call 23's ablations agree: the softmax, the ex2s and the
# loads each cost ~20% of the kernel, and the ping-pong nothing.
#   A (prefill-wait-after-softmax.patch): a never-taken branch on the rows' sums ends
#     the basic block after the softmax; in the SASS every ex2 then comes before the
#     wait. Same registers (168; 224 a consumer), no spills, the same arithmetic.
#   B (prefill-fence-copies-only.patch, after A): the consumers' proxy fence
#     (MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S) only for tiles loaded by copies.
# One binary (this checkout's), three kernels dirs (TANDEM_CUDA_KERNELS):
# 1. `attn --layers 1` with A at blocks of 64 and 16, and with B: against the mma.sync
#    kernel on 1..32k prompts, whole, chunked and cached, by TMA and by copies.
# 2. `attn --speed` (an 8192-token chunk after 0 and after 24576 cached keys, 2 layers)
#    with main, A and B, taking turns twice.
# 3. The 8B prefill (1k, 8k, 32k) with main and A taking turns twice, transformers SDPA
#    once between: issue 15's SDPA ratios.
# 4. The GPU tests with A's kernels, then `kernels` with main and A (the prefill
#    attention's µs a layer for an 8192-token chunk after 0 and after 24576 keys).
# The results are re-tarred after every step, so a kill still brings back what ran.
# Carry .gpu30 (`WHICH=30 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c25
G=$PWD/.gpu30 K=$PWD/.gpu30/k
unxz_to /tmp/gm .gpu30/tandem-gpu-bench.xz .gpu30/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c25.tgz" c25; }
show() { grep -E "worst|^\| (1024|8192|32768) \| [0-9.]+ \|" "$O/$1.md" | cut -c1-160; }
run() { date -u +%T.%N; step "$1" "$2" "$K/$3" /tmp/gm/tandem-gpu-bench "${@:4}"; show "$1"; save; }
run check-A 60 A attn --layers 1
run check-A-bs16 40 A attn --layers 1 --block-size 16
run check-B 50 B attn --layers 1
for r in 1 2; do
  for v in main A B; do run "speed-$v-$r" 40 "$v" attn --speed; done
done
for r in 1 2; do
  for v in main A; do run "prefill-$v-$r" 45 "$v" bench --shape llama3-8b --only prefill; done
  [ "$r" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python "$G/hf_reference.py" baseline --prefill 8192,32768 --runs 3 --decode ""; grep -E "^\| prefill" "$O/torch.md"; save; }
done
date -u +%T.%N; step gpu-tests-A 150 "$K/A" /tmp/gm/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-A.md" | cut -c1-300; save
for v in main A; do
  date -u +%T.%N; step "kernels-$v" 45 "$K/$v" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b
  grep -E "^Kernel by kernel, a prefill|^\| prefill_attn" "$O/kernels-$v.md" | cut -c1-160; save
done
date -u +%T.%N
smi_stop
save
