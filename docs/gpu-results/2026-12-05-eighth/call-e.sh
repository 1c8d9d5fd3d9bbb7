#!/usr/bin/env bash
# Device call E (issue 15; written in the eighth session, not yet run): the split-K gemv
# (scripts/gpu-pending/gemv-split-k.patch: 1, 2 or 4 warps per output row so a batch-1
# product makes at least two waves). Every GPU test with it, then `kernels` (its
# product table gives µs per product at 1 row) and the decode sweep, main and split
# taking turns. Carry .gpu14 (scripts/gpu-pending/prepare.sh, WHICH=14). DEADLINE_S (580).
set -u
O=${OUT:-/tmp/out}/e; mkdir -p "$O" /tmp/g14/main /tmp/g14/split
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
for f in main/tandem-gpu-bench split/tandem-gpu-bench split/engine-tests; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    ".gpu14/$f.xz" "/tmp/g14/$f" && chmod +x "/tmp/g14/$f"
done
MAIN=$PWD/.gpu14/main/kernels SPLIT=$PWD/.gpu14/split/kernels
t0=$(date +%s)
step() { # name limit kernels command...
  local name=$1 limit=$2 k=$3; shift 3
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  TANDEM_CUDA_KERNELS=$k timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
cat "$O/env.txt"
step gpu-tests-split 170 "$SPLIT" /tmp/g14/split/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-split.md" | cut -c1-300
step kernels-main 40 "$MAIN" /tmp/g14/main/tandem-gpu-bench kernels --shape llama3-8b
step kernels-split 40 "$SPLIT" /tmp/g14/split/tandem-gpu-bench kernels --shape llama3-8b
step decode-split-1 95 "$SPLIT" /tmp/g14/split/tandem-gpu-bench bench --shape llama3-8b --only decode
step decode-main-1 95 "$MAIN" /tmp/g14/main/tandem-gpu-bench bench --shape llama3-8b --only decode
step decode-split-2 95 "$SPLIT" /tmp/g14/split/tandem-gpu-bench bench --shape llama3-8b --only decode
for f in "$O"/kernels-*.md; do echo "== $f"; grep -E "^\| [a-z_]+ \([0-9]+ × [0-9]+\) \| 1 \||graph replay" "$f" | head -8; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|8|64|256) \|" "$f"; done
