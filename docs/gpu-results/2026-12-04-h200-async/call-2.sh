#!/usr/bin/env bash
# Device call 2: TTFT bf16 disaggregated (4 and 8 QUIC connections), colocated,
# and disaggregated in one `tandem up` process (one CUDA context); then kv_bench
# QUIC vs TCP at 1472 / 8952 / 65527-byte datagrams on the 16-core host.
set -u
G=${GPU_DIR:-.gpu7}; O=${OUT:-/tmp/out}/f; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
RUST_LOG=info,tandem_decode=debug UP=1 KVCONN=8 OUT=$O/ttft GPU_DIR=$G SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 300 bash scripts/gpu_ttft.sh > "$O/ttft.out" 2>&1; el ttft $?
pkill -9 -f "$G/tandem" ; sleep 1
tar -czf "$O/ttft-logs.tgz" -C "$O" ttft && rm -rf "$O/ttft"
OUT=$O/kv timeout -s KILL 270 bash scripts/kv_bench_mtu.sh "$G/kv_bench" > "$O/kv.out" 2>&1; el kv_bench $?
tar -czf "$O/kv.tgz" -C "$O" kv
ls -la "$O"
