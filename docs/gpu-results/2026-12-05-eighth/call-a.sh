#!/usr/bin/env bash
# Device call A (issue 15, eighth session; wanted on an H200): the GPU tests with the
# L2 bound the larger of 1e-2 and the model's bf16 noise (all 14 should pass), the
# decode sweep of main (.gpu13) and of 28df44d (.gpu8/old, before the large-batch
# decode kernels) taking turns, then where main's decode step goes (`kernels`).
# Carry .gpu13 and .gpu8. DEADLINE_S (580): steps that might not end within it are skipped.
set -u
O=${OUT:-/tmp/out}/a; G=/tmp/gpu13; mkdir -p "$O" "$G"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
MAIN=$PWD/.gpu13/kernels OLD=$PWD/.gpu8/old/kernels
for b in tandem-gpu-bench engine-tests; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    ".gpu13/$b.xz" "$G/$b" && chmod +x "$G/$b"
done
t0=$(date +%s)
step() { # name limit kernels command...: one step, skipped when it might pass the deadline
  local name=$1 limit=$2 k=$3; shift 3
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  TANDEM_CUDA_KERNELS=$k timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
cat "$O/env.txt"
step gpu-tests 170 "$MAIN" "$G/engine-tests" --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300
step decode-main-1 110 "$MAIN" "$G/tandem-gpu-bench" bench --shape llama3-8b --only decode
step decode-old-1 110 "$OLD" .gpu8/old/tandem-gpu-bench bench --shape llama3-8b --only decode
step kernels 100 "$MAIN" "$G/tandem-gpu-bench" kernels --shape llama3-8b
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|64|256) \|" "$f"; done
