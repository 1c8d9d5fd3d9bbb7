#!/usr/bin/env bash
# Device call 1 (2026-12-04, late): the asynchronous CUDA KV import's first run.
# GPU tests (import round trip, fp8 import-then-decode), TTFT bf16 disaggregated
# and colocated, fp8 disaggregated, then the fp8 ws-producer variant's check.
set -u
G=${GPU_DIR:-.gpu7}; O=${OUT:-/tmp/out}/e; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
timeout -s KILL 150 "$G/engine-tests" --ignored cuda:: --test-threads 1 > "$O/gpu-tests.md" 2>&1; el tests $?
RUST_LOG=info,tandem_decode=debug OUT=$O/ttft-bf16 GPU_DIR=$G SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 170 bash scripts/gpu_ttft.sh > "$O/ttft-bf16.out" 2>&1; el "ttft bf16" $?
pkill -9 -f "$G/tandem" ; sleep 1
RUST_LOG=info,tandem_decode=debug KVDTYPE=fp8_e4m3 NOCOLO=1 OUT=$O/ttft-fp8 GPU_DIR=$G SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 80 bash scripts/gpu_ttft.sh > "$O/ttft-fp8.out" 2>&1; el "ttft fp8" $?
pkill -9 -f "$G/tandem" ; sleep 1
tar -czf "$O/ttft-logs.tgz" -C "$O" ttft-bf16 ttft-fp8 && rm -rf "$O/ttft-bf16" "$O/ttft-fp8"
for d in "$G"/var/*; do
  TANDEM_CUDA_KERNELS=$PWD/$d timeout -s KILL 90 "$G/tandem-gpu-bench" attn --kv-dtype fp8_e4m3 \
    > "$O/attn8-$(basename "$d").md" 2>&1; el "attn8 $(basename "$d")" $?
done
ls -la "$O"
