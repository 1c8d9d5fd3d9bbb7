#!/usr/bin/env bash
# Device call D (issue 15, eighth session): decode_attn merging its own splits (the
# last split of a sequence and KV head to finish; attn_combine gone), .gpu14, against
# main before it (.gpu13 with the sampling kernels now on main, .gpu13/kernels-var):
# every GPU test, the decode sweep new and old taking turns, then `kernels` (new).
# Carry .gpu13 and .gpu14 (.gpu14: prepare.sh's folder 13 built from a checkout with
# decode-attn-merged-splits.patch, in this folder, applied). DEADLINE_S (580).
set -u
O=${OUT:-/tmp/out}/d; mkdir -p "$O" /tmp/g13 /tmp/g14
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
OLD=$PWD/.gpu13/kernels-var NEW=$PWD/.gpu14/kernels
for d in 13 14; do for b in tandem-gpu-bench engine-tests; do
  [ -f ".gpu$d/$b.xz" ] || continue
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    ".gpu$d/$b.xz" "/tmp/g$d/$b" && chmod +x "/tmp/g$d/$b"
done; done
t0=$(date +%s)
step() { # name limit kernels command...
  local name=$1 limit=$2 k=$3; shift 3
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  TANDEM_CUDA_KERNELS=$k timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
cat "$O/env.txt"
step gpu-tests-new 170 "$NEW" /tmp/g14/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-new.md" | cut -c1-300
step decode-new-1 95 "$NEW" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode
step decode-old-1 95 "$OLD" /tmp/g13/tandem-gpu-bench bench --shape llama3-8b --only decode
step kernels-new 40 "$NEW" /tmp/g14/tandem-gpu-bench kernels --shape llama3-8b
step decode-new-2 95 "$NEW" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|8|64|256) \|" "$f"; done
