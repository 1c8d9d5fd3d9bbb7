#!/usr/bin/env bash
# SmolLM2-135M-Instruct (GGUF) on the CUDA backend against the CPU backend, on a
# GPU machine. The device tool carries at most 64 MiB a call and replaces a carried
# folder wholesale, so the 98 MB model travels in two calls made back to back while
# the machine is warm (it keeps /tmp between them):
#   here:  M=models/SmolLM2-135M-Instruct.Q4_1.gguf
#          head -c 48000000 $M > .gpu2/smollm2.part1; tail -c +48000001 $M > .gpu/smollm2.part2
#          and the stripped tandem-gpu-bench and this script into .gpu2/
#   call 1 (carry .gpu2): mkdir -p /tmp/p && cp .gpu2/* /tmp/p/
#   call 2 (carry .gpu):  cp .gpu/smollm2.part2 /tmp/p/ && GPU_DIR=/tmp/p bash /tmp/p/gpu_smollm2.sh
# The parts are put back together and SHA-256-checked here; results go to $OUT.
set -u
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/tandem-gpu-out}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
MODEL=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } | tee "$OUT/env.txt"
cat "${PART1:-$GPU_DIR/smollm2.part1}" "${PART2:-$GPU_DIR/smollm2.part2}" > "$MODEL"
echo "$SHA  $MODEL" | sha256sum -c - || exit 1
B=$GPU_DIR/tandem-gpu-bench
step() { local t=$1 name=$2; shift 2; echo "=== $name (limit ${t}s)"; timeout "$t" "$@" 2>&1 | tee -a "$OUT/$name.md"; echo "=== $name rc=${PIPESTATUS[0]}"; }
step 200 smollm2 "$B" real --model "$MODEL"
step 200 check "$B" check --dir /tmp/tandem-check
