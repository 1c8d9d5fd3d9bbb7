#!/usr/bin/env bash
# Kernel work on a GPU machine with no Rust toolchain: the binaries under
# $GPU_DIR (built once with --features cuda) compile the kernels at start from
# engine/src/cuda/kernels of this checkout (TANDEM_CUDA_KERNELS), so a kernel
# edit is measured without a rebuild as long as its launch stays the same.
#   STEPS="check attn bench"  which steps, in order (default: all three):
#     check    CPU vs GPU on the synthesized models (tandem-gpu-bench check)
#     attn     wgmma vs mma.sync prefill attention on 1..32k-token prompts
#     attn8    the same with an fp8_e4m3 KV cache (both kernels' fp8 instances)
#     attnw    the same with a 1000-token sliding window and 24-token cache blocks
#              (the windowed path and the per-row block lookup)
#     bench    the llama3-8b benchmark (decode sweep, prefill, export)
#     prefill  its prefill part alone (`bench --only prefill`: ~1/3 of the time)
#     torch    transformers SDPA prefill of the same shape, 8k and 32k ($GPU_DIR/hf_reference.py)
#     bench90  the same with the portable kernels (TANDEM_CUDA_ARCH=sm_90)
#     kernels  where a decode step's time goes
#     variants the checkout's kernels, then each kernel-variant directory under
#              $GPU_DIR/var, through VAR_ARGS (default: the quick decode sweep);
#              with RUNS>1 the variants take turns, run after run
#     tests    the GPU unit tests ($GPU_DIR/engine-tests --ignored cuda::), fp8 included
#     memcheck compute-sanitizer memcheck over `check` (the toolkit's, if present)
#     synccheck compute-sanitizer synccheck over `attn --layers 1` (barrier misuse)
#   RUNS=3    how many times each bench step runs (medians and ranges over runs)
# Writes one Markdown file per step under $OUT.
set -u
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-/tmp/tandem-gpu-out}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
B=$GPU_DIR/tandem-gpu-bench
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; git log -1 --format='%h %s' 2>/dev/null; } > "$OUT/env.txt"
for s in ${STEPS:-check attn bench}; do
  for r in $(seq 1 "${RUNS:-1}"); do
    case $s in
      check) timeout 240 "$B" check --dir /tmp/tandem-check ;;
      attn) timeout 240 "$B" attn ;;
      attn8) timeout 240 "$B" attn --kv-dtype fp8_e4m3 ;;
      attnw) timeout 240 "$B" attn --window 1000 --block-size 24 ;;
      bench) timeout 400 "$B" bench --shape llama3-8b ;;
      prefill) timeout 300 "$B" bench --shape llama3-8b --only prefill ;;
      torch) timeout 300 /opt/torch/.venv/bin/python "$GPU_DIR/hf_reference.py" baseline --prefill 8192,32768 --runs "${RUNS:-3}" --decode "" ;;
      bench90) TANDEM_CUDA_ARCH=sm_90 timeout 400 "$B" bench --shape llama3-8b ;;
      kernels) timeout 150 "$B" kernels --shape llama3-8b ;;
      variants)
        for d in "$PWD/engine/src/cuda/kernels" "$GPU_DIR"/var/*; do
          [ -d "$d" ] || continue
          echo "#### kernels: $(basename "$d") (run $r)"
          # shellcheck disable=SC2086
          TANDEM_CUDA_KERNELS=$d timeout 150 "$B" ${VAR_ARGS:-bench --shape llama3-8b --only decode --quick}
        done ;;
      tests) timeout 300 "$GPU_DIR/engine-tests" --ignored cuda:: --test-threads 1 ;;
      memcheck) timeout 400 /usr/local/cuda/bin/compute-sanitizer --tool memcheck "$B" check --dir /tmp/tandem-check ;;
      synccheck) timeout 400 /usr/local/cuda/bin/compute-sanitizer --tool synccheck "$B" attn --layers 1 ;;
      *) echo "unknown step $s"; false ;;
    esac >> "$OUT/$s.md" 2>&1
    echo "=== $s run $r rc=$? ($(date -u +%T))"
    case $s in check|attn|attn8|attnw|kernels|tests|memcheck|synccheck|torch) break ;; esac
  done
done
