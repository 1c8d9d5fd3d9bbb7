#!/usr/bin/env bash
# Device call (issue 15): the GPU tests against the CPU reference that rounds its
# activations to bf16 where the GPU does (cuda::check; each report also gives the
# L2 against the CPU in f32, `prefill_l2_f32`), then the 8B prefill of main
# (TMA) and transformers SDPA in the same call, taking turns.
# Carry .gpu13 (scripts/gpu-pending/prepare.sh, WHICH=13). DEADLINE_S (580):
# steps that might not end within it are skipped.
set -u
O=${OUT:-/tmp/out}/v; G=/tmp/gpu13; mkdir -p "$O" "$G"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
export TANDEM_CUDA_KERNELS=$PWD/.gpu13/kernels
for b in tandem-gpu-bench engine-tests; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    ".gpu13/$b.xz" "$G/$b" && chmod +x "$G/$b"
done
t0=$(date +%s)
step() { # name limit command...: one step, skipped when it might pass the deadline
  local name=$1 limit=$2; shift 2
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
step gpu-tests 170 "$G/engine-tests" --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|CheckReport" "$O/gpu-tests.md" | cut -c1-260
step prefill-1 90 "$G/tandem-gpu-bench" bench --shape llama3-8b --only prefill
step torch 120 /opt/torch/.venv/bin/python .gpu13/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
step prefill-2 90 "$G/tandem-gpu-bench" bench --shape llama3-8b --only prefill
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
