#!/usr/bin/env bash
# Device call (issue 15, prefill attention): the warp-specialized kernel's tiles
# loaded by TMA (engine/src/cuda/tensor_map.rs) against the same kernel's
# cp.async copies (TANDEM_CUDA_TMA=0) and the portable mma.sync kernel, in one
# process (`attn`: logits of 1..32k-token prompts, whole, chunked, from cached
# prefixes; then the speed of the last 8k chunk); the 8B prefill with TMA and
# without, taking turns; transformers SDPA in the same call; `check` (CPU vs
# GPU on the synthesized models) last.
# Carry .gpu12: tandem-gpu-bench of this checkout (--features cuda, release,
# stripped) and scripts/hf_reference.py. DEADLINE_S (580): steps that might not
# end within it are skipped.
set -u
O=${OUT:-/tmp/out}/t; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
B=.gpu12/tandem-gpu-bench
t0=$(date +%s)
step() { # name limit command...: one step, skipped when it might pass the deadline
  local name=$1 limit=$2; shift 2
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  rc=$?; echo "$name rc=$rc at $(( $(date +%s) - t0 )) s"
}
rc=0
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
step attn 150 "$B" attn
# A TMA pipeline that never completes its barrier hangs the kernel: then only
# the copies run below.
if [ "$rc" = 137 ]; then echo "attn hung: TMA steps skipped"; export TANDEM_CUDA_TMA=0; fi
step prefill-tma-1 90 "$B" bench --shape llama3-8b --only prefill
step prefill-copies-1 90 env TANDEM_CUDA_TMA=0 "$B" bench --shape llama3-8b --only prefill
step torch 120 /opt/torch/.venv/bin/python .gpu12/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
step prefill-tma-2 90 "$B" bench --shape llama3-8b --only prefill
step prefill-copies-2 90 env TANDEM_CUDA_TMA=0 "$B" bench --shape llama3-8b --only prefill
step attn-bs64 90 "$B" attn --block-size 64 --speed
step check 150 "$B" check --dir /tmp/tandem-check
for f in "$O"/attn*.md; do echo "== $f"; grep -E "^\| (8192|32768) \||worst|Error|error|panick" "$f"; done
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
echo "== check"; grep -E "FAIL|fail|pass|error" "$O/check.md" 2>/dev/null | tail -12
