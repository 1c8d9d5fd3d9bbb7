#!/usr/bin/env bash
# One device call (2026-12-04 night): the portable kernel's barrier fix checked
# (attn: both kernels bit-identical; synccheck for a minute), the cluster's TTFT
# with the parallel KV import (bf16 and fp8, disaggregated). Logs go into one
# tarball (the files that come back are few).
set -u
G=${GPU_DIR:-.gpu7}; O=${OUT:-/tmp/out}/d; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
timeout 70 "$G/tandem-gpu-bench" attn > "$O/attn.md" 2>&1; echo "attn rc=$? $(date -u +%T)"
timeout -s KILL 60 /usr/local/cuda/bin/compute-sanitizer --tool synccheck "$G/tandem-gpu-bench" attn --layers 1 \
  > "$O/synccheck.md" 2>&1; echo "synccheck rc=$? $(date -u +%T)"
RUST_LOG=info,tandem_decode=debug NOCOLO=1 OUT=$O/ttft-bf16 GPU_DIR=$G SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 95 bash scripts/gpu_ttft.sh > "$O/ttft-bf16.out" 2>&1; echo "ttft bf16 rc=$? $(date -u +%T)"
pkill -9 -f "$G/tandem" ; sleep 1
RUST_LOG=info,tandem_decode=debug KVDTYPE=fp8_e4m3 NOCOLO=1 OUT=$O/ttft-fp8 GPU_DIR=$G SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 75 bash scripts/gpu_ttft.sh > "$O/ttft-fp8.out" 2>&1; echo "ttft fp8 rc=$? $(date -u +%T)"
pkill -9 -f "$G/tandem" ; sleep 1
tar -czf "$O/ttft-logs.tgz" -C "$O" ttft-bf16 ttft-fp8 && rm -rf "$O/ttft-bf16" "$O/ttft-fp8"
ls -la "$O"
