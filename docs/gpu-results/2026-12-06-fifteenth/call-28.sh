#!/usr/bin/env bash
# Device call 28 (sixteenth session; ~330 s, kind nvidia-h200, carry .gpu30 with k/U):
# the Hopper prefill attention with its consumer's warp index read through a shuffle
# (k/U: this checkout's kernels). ptxas then treats the warpgroup's loop bounds and stage
# offsets as uniform, and computes the wgmma descriptors in uniform registers: the 16
# HGMMAs of a tile are issued in 39 instructions instead of 113, and the kernel is 4576
# instructions instead of 4960 (call 27's profile put ~6 integer instructions, 64-bit
# descriptor adds and R2UR, ahead of each HGMMA). Same registers (168), no spills, the same
# arithmetic. Against main's kernels with .gpu30's binary (32dcca8; the kernels' signatures
# are unchanged):
# 1. `attn --layers 1` with U (against the mma.sync kernel, TMA and copies).
# 2. `attn --speed` main/U taking turns three times.
# 3. The 8B prefill main/U taking turns twice, transformers SDPA once between.
# 4. The GPU tests with U; `kernels` main/U (prefill attention µs a layer).
# 5. Nsight Compute: the 32k prompt's last chunk (launch 44) with main and U, time and
#    instructions executed.
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c28
G=$PWD/.gpu30 K=$PWD/.gpu30/k
unxz_to /tmp/gm .gpu30/tandem-gpu-bench.xz .gpu30/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c28.tgz" c28; }
show() { grep -E "worst|^\| (1024|8192|32768) \| [0-9.]+ \|" "$O/$1.md" | cut -c1-160; }
run() { date -u +%T.%N; step "$1" "$2" "$K/$3" /tmp/gm/tandem-gpu-bench "${@:4}"; show "$1"; save; }
run check-U 60 U attn --layers 1
for r in 1 2 3; do
  for v in main U; do run "speed-$v-$r" 40 "$v" attn --speed; done
done
for r in 1 2; do
  for v in main U; do run "prefill-$v-$r" 45 "$v" bench --shape llama3-8b --only prefill; done
  [ "$r" = 1 ] && { date -u +%T.%N; step torch 60 "" /opt/torch/.venv/bin/python "$G/hf_reference.py" baseline --prefill 8192,32768 --runs 3 --decode ""; grep -E "^\| prefill" "$O/torch.md"; save; }
done
date -u +%T.%N; step gpu-tests-U 150 "$K/U" /tmp/gm/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-U.md" | cut -c1-300; save
for v in main U; do
  date -u +%T.%N; step "kernels-$v" 45 "$K/$v" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b
  grep -E "^Kernel by kernel, a prefill|^\| prefill_attn" "$O/kernels-$v.md" | cut -c1-160; save
done
NCU=$(ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for v in main U; do
  date -u +%T.%N
  TANDEM_CUDA_KERNELS=$K/$v timeout -s KILL 60 "$NCU" --clock-control none -k regex:prefill_attn \
    --launch-skip 44 -c 1 --metrics gpu__time_duration.sum,smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed \
    /tmp/gm/tandem-gpu-bench attn --speed > "$O/ncu-$v.txt" 2>&1
  echo "ncu $v rc=$?"; grep -E "gpu__time|inst_executed|hmma" "$O/ncu-$v.txt"; save
done
date -u +%T.%N
smi_stop
save
