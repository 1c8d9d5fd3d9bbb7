#!/usr/bin/env bash
# Device call 3: the decode kernels reworked (rope_kv one block a token, silu_mul
# and add_rmsnorm vectorised, decode_attn writing the output itself at one split):
# GPU tests, then the decode sweep of the previous binary + kernels (.gpu7/old)
# and of this one, taking turns, then where a step's time goes now.
set -u
G=${GPU_DIR:-.gpu7}; O=${OUT:-/tmp/out}/g; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib
NEW=$PWD/engine/src/cuda/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
TANDEM_CUDA_KERNELS=$NEW timeout -s KILL 150 "$G/engine-tests" --ignored cuda:: --test-threads 1 > "$O/gpu-tests.md" 2>&1; el tests $?
for r in 1 2; do
  TANDEM_CUDA_KERNELS=$PWD/$G/old/kernels timeout -s KILL 120 "$G/old/tandem-gpu-bench" bench --shape llama3-8b --only decode \
    > "$O/decode-old-$r.md" 2>&1; el "decode old $r" $?
  TANDEM_CUDA_KERNELS=$NEW timeout -s KILL 120 "$G/tandem-gpu-bench" bench --shape llama3-8b --only decode \
    > "$O/decode-new-$r.md" 2>&1; el "decode new $r" $?
done
TANDEM_CUDA_KERNELS=$NEW timeout -s KILL 100 "$G/tandem-gpu-bench" kernels --shape llama3-8b > "$O/kernels.md" 2>&1; el kernels $?
tar -czf "$O/decode.tgz" -C "$O" $(cd "$O" && ls decode-*.md) && rm -f "$O"/decode-*.md
ls -la "$O"
