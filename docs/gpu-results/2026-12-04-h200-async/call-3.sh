#!/usr/bin/env bash
# Device call 3: the large-batch decode kernels (first decode-kernels-b256.patch; rope_kv one block
# a token, silu_mul and add_rmsnorm vectorised, decode_attn writing the output
# itself at one split): its GPU tests, then the decode sweep of main's binary and
# kernels ($G/old) and of the patched ones ($G/patched), taking turns, then where
# a step's time goes with the patch (ROUNDS=1 for one round, KERNELS=0 without
# the breakdown). Carry .gpu8 (built as scripts/gpu-pending/README.md says).
set -u
G=${GPU_DIR:-.gpu8}; O=${OUT:-/tmp/out}/g; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib
NEW=$PWD/$G/patched/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
TANDEM_CUDA_KERNELS=$NEW timeout -s KILL 150 "$G/patched/engine-tests" --ignored cuda:: --test-threads 1 > "$O/gpu-tests.md" 2>&1; el tests $?
for r in $(seq 1 "${ROUNDS:-2}"); do
  TANDEM_CUDA_KERNELS=$PWD/$G/old/kernels timeout -s KILL 120 "$G/old/tandem-gpu-bench" bench --shape llama3-8b --only decode \
    > "$O/decode-old-$r.md" 2>&1; el "decode old $r" $?
  TANDEM_CUDA_KERNELS=$NEW timeout -s KILL 120 "$G/patched/tandem-gpu-bench" bench --shape llama3-8b --only decode \
    > "$O/decode-new-$r.md" 2>&1; el "decode new $r" $?
done
[ "${KERNELS:-1}" = 0 ] || TANDEM_CUDA_KERNELS=$NEW timeout -s KILL 100 "$G/patched/tandem-gpu-bench" kernels --shape llama3-8b > "$O/kernels.md" 2>&1; el kernels $?
tar -czf "$O/decode.tgz" -C "$O" $(cd "$O" && ls decode-*.md) && rm -f "$O"/decode-*.md
ls -la "$O"
