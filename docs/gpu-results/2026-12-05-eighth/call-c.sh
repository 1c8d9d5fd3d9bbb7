#!/usr/bin/env bash
# Device call C (eighth session): main's kernels with scripts/gpu-variants/
# sampling-loads-in-flight.patch applied (.gpu13/kernels-var: .gpu13/kernels with the
# patched sampling.cu), under main's binaries: every GPU test, then `rows` (a step's
# cost by draw and logprobs asked) with main's kernels and the variant's, taking turns.
# Carry .gpu13. DEADLINE_S (580).
set -u
O=${OUT:-/tmp/out}/c; G=/tmp/gpu13; mkdir -p "$O" "$G"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
MAIN=$PWD/.gpu13/kernels VAR=$PWD/.gpu13/kernels-var
for b in tandem-gpu-bench engine-tests; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    ".gpu13/$b.xz" "$G/$b" && chmod +x "$G/$b"
done
t0=$(date +%s)
step() { # name limit kernels command...
  local name=$1 limit=$2 k=$3; shift 3
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  TANDEM_CUDA_KERNELS=$k timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
cat "$O/env.txt"
step gpu-tests-var 170 "$VAR" "$G/engine-tests" --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-var.md" | cut -c1-300
step rows-main 50 "$MAIN" "$G/tandem-gpu-bench" rows --shape llama3-8b
step rows-var 50 "$VAR" "$G/tandem-gpu-bench" rows --shape llama3-8b
for f in "$O"/rows-*.md; do echo "== $f"; grep -E "^\| (1|64) \|" "$f"; done
