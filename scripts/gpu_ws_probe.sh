#!/usr/bin/env bash
# Prefill attention probe on a GPU machine (binaries under $GPU_DIR built once):
# `tandem-gpu-bench attn --speed` (ATTN_ARGS="" for the whole check) for the checkout's kernels and for
# each variant directory under $GPU_DIR/var (TANDEM_CUDA_KERNELS), then Nsight
# Compute on one launch of each kernel (the 8192-token chunk after 24576 cached
# tokens, layer 0) when `ncu` is there. Writes under $OUT.
set -u
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/tandem-gpu-out}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
B=$GPU_DIR/tandem-gpu-bench
for d in "$PWD/engine/src/cuda/kernels" "$GPU_DIR"/var/*; do
  [ -d "$d" ] || continue
  echo "=== $(basename "$d")" >> "$OUT/speed.md"
  TANDEM_CUDA_KERNELS=$d timeout 200 "$B" attn ${ATTN_ARGS---speed} >> "$OUT/speed.md" 2>&1
  echo "=== $(basename "$d") rc=$? ($(date -u +%T))"
done
NCU=$(ls /usr/local/cuda/bin/ncu /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -1)
[ -n "${NCU:-}" ] || { echo "no ncu"; exit 0; }
[ -n "${NCU_SKIP:-}" ] || exit 0
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
# attn --speed launches prefill_attn_* 8 + 8 times for the 8k prompt, then 6 + 8
# for the 32k one on each backend (mma.sync first): launch 22 is the mma.sync
# kernel's, launch 36 the wgmma kernel's first 24576..32768 chunk.
for skip in $NCU_SKIP; do
  timeout 300 "$NCU" -k regex:prefill_attn --launch-skip "$skip" -c 1 --set full \
    "$B" attn --speed > "$OUT/ncu-$skip.txt" 2>&1
  echo "=== ncu skip $skip rc=$? ($(date -u +%T))"
done
