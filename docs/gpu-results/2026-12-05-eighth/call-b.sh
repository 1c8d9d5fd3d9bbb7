#!/usr/bin/env bash
# Device call B (issue 15, eighth session; on the card of call A): cuBLAS through torch
# on the 8B products (gemm_probe.py, beside call A's `kernels` table), then the 8B
# prefill of main (TMA) and transformers SDPA in the same call, taking turns.
# Carry .gpu13. DEADLINE_S (580).
set -u
O=${OUT:-/tmp/out}/b; G=/tmp/gpu13; mkdir -p "$O" "$G"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
export TANDEM_CUDA_KERNELS=$PWD/.gpu13/kernels
D=$(dirname "$0")
python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
  .gpu13/tandem-gpu-bench.xz "$G/tandem-gpu-bench" && chmod +x "$G/tandem-gpu-bench"
t0=$(date +%s)
step() { # name limit command...
  local name=$1 limit=$2; shift 2
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
cat "$O/env.txt"
step gemm 60 /opt/torch/.venv/bin/python "$D/gemm_probe.py"
cat "$O/gemm.md"
step prefill-1 90 "$G/tandem-gpu-bench" bench --shape llama3-8b --only prefill
step torch 120 /opt/torch/.venv/bin/python .gpu13/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
step prefill-2 90 "$G/tandem-gpu-bench" bench --shape llama3-8b --only prefill
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
