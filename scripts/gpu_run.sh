#!/usr/bin/env bash
# Everything the CUDA backend is checked and measured with, in one call on a GPU
# machine (see docs/GPU_BENCH.md). Expects the bench binary and this folder's
# Python script under $GPU_DIR (default .gpu), writes Markdown under $OUT.
#   MODE=smoke  : correctness on small models and a 4-layer quick bench
#   MODE=ours   : correctness (CPU and HF) and our benchmark, no PyTorch baseline
#   MODE=full   : everything (default)
#   KERNELS=1   : then where a decode step's time goes (tandem-gpu-bench kernels)
#   SMOKE=1     : then the cluster as separate processes on the GPU (gpu_1p1d_smoke.sh)
#   $GPU_DIR/engine-tests, when there (the engine's unit-test binary built with
#   --features cuda): its GPU tests (`--ignored cuda::check`) run after `check`
set -u
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/tandem-gpu-out}
MODE=${MODE:-full}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
PY=/opt/torch/.venv/bin/python
B=$GPU_DIR/tandem-gpu-bench
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} | tee "$OUT/env.txt"
step() { local t=$1 name=$2; shift 2; echo "=== $name (limit ${t}s)"; timeout "$t" "$@" 2>&1 | tee -a "$OUT/$name.md"; echo "=== $name rc=${PIPESTATUS[0]}"; }
step 150 check "$B" check --dir /tmp/tandem-check
if [ -x "$GPU_DIR/engine-tests" ]; then
  step 300 gpu-tests "$GPU_DIR/engine-tests" --ignored cuda::check --test-threads 1
fi
if [ "$MODE" = smoke ]; then
  step 120 bench "$B" bench --shape llama3-8b --layers 4 --quick
  step 150 hfref $PY "$GPU_DIR/hf_reference.py" reference --dir /tmp/hf-llama3-2l --layers 2
  step 100 hf "$B" hf --dir /tmp/hf-llama3-2l
else
  step 150 hfref $PY "$GPU_DIR/hf_reference.py" reference --dir /tmp/hf-llama3-2l --layers 2
  step 100 hf "$B" hf --dir /tmp/hf-llama3-2l
  step 240 bench "$B" bench --shape llama3-8b
  if [ "$MODE" = full ]; then
  step 200 baseline $PY "$GPU_DIR/hf_reference.py" baseline --layers 32
  fi
fi
if [ "${KERNELS:-0}" = 1 ]; then
  step 60 kernels "$B" kernels --shape llama3-8b
fi
if [ "${SMOKE:-0}" = 1 ]; then
  step 120 cluster env OUT=/tmp/tandem-1p1d bash "$GPU_DIR/gpu_1p1d_smoke.sh"
fi
