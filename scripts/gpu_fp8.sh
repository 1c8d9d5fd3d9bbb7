#!/usr/bin/env bash
# FP8 (e4m3) KV cache on the CUDA backend, measured on a GPU machine in calls
# that build nothing (docs/FP8_KV.md, "CUDA"). Expects under $GPU_DIR (default
# .gpu) the stripped binaries tandem-gpu-bench, kv_bench and engine-tests (the
# engine's unit-test binary built with --features cuda); writes under $OUT.
#   PART=1 : the GPU tests (the fp8 store bit for bit against the CPU quantizer,
#            the check suite with a bf16 and with an fp8 cache against the CPU,
#            sampling), then the 8B-shape benchmark with an fp8 cache
#   PART=2 : the same benchmark with a bf16 cache (the side-by-side baseline),
#            and kv_bench moving an 8k prompt's KV as bf16 (8192 tokens) and as
#            fp8 (its bytes: those of 4100 bf16 tokens, within 0.3%)
#   PART=all (default): both
set -u
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/tandem-gpu-out}
PART=${PART:-all}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
B=$GPU_DIR/tandem-gpu-bench
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
} | tee "$OUT/env.txt"
step() { local t=$1 name=$2; shift 2; echo "=== $name (limit ${t}s)"; timeout "$t" "$@" 2>&1 | tee -a "$OUT/$name.md"; echo "=== $name rc=${PIPESTATUS[0]}"; }
if [ "$PART" = 1 ] || [ "$PART" = all ]; then
  step 300 gpu-tests "$GPU_DIR/engine-tests" --ignored cuda::check --test-threads 1 --nocapture
  step 200 bench-fp8 "$B" bench --shape llama3-8b --quick --kv-dtype fp8_e4m3
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
  step 200 bench-bf16 "$B" bench --shape llama3-8b --quick
  step 150 kv-bench "$GPU_DIR/kv_bench" --tokens 8192,4100 --conns 4 --tcp-conns 1 \
    --rx-endpoints 0 --overlap-tokens 2048 --overlap-chunk-tokens 0
fi
