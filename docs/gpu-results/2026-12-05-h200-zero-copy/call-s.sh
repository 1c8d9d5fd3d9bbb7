#!/usr/bin/env bash
# Device call: scripts/gpu-variants/sampling-loads-in-flight.patch (sample_rows and
# row_logprobs with 8 loads in flight per thread; kernels only, results bit-identical
# by construction) against the checkout's kernels, both with this checkout's binaries:
# the GPU tests with the variant's kernels (sampling, masks and logprobs against the
# host included), then `rows` (a decode step's cost by draw and by logprobs asked, at
# batch 1, 8 and 64) and the quick decode sweep (greedy), the two kernel sets taking
# turns. Carry .gpu11 (scripts/gpu-pending/prepare.sh, WHICH=11).
set -u
G=/tmp/gpu11; O=${OUT:-/tmp/out}/s; mkdir -p "$G" "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
for b in tandem-gpu-bench engine-tests; do
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    ".gpu11/$b.xz" "$G/$b" && chmod +x "$G/$b"
done
MAIN=$PWD/.gpu11/kernels-main
VAR=$PWD/.gpu11/var/sampling-loads-in-flight
TANDEM_CUDA_KERNELS=$VAR timeout -s KILL 200 "$G/engine-tests" --ignored cuda:: --test-threads 1 \
  > "$O/gpu-tests-var.md" 2>&1; el "tests (variant kernels)" $?
grep -E "^test result|FAILED|panicked" "$O/gpu-tests-var.md" | head -5
for r in 1 2; do
  for k in main var; do
    d=$MAIN; [ "$k" = var ] && d=$VAR
    TANDEM_CUDA_KERNELS=$d timeout -s KILL 90 "$G/tandem-gpu-bench" rows --shape llama3-8b \
      > "$O/rows-$k-$r.md" 2>&1; el "rows $k $r" $?
  done
done
for k in main var; do
  d=$MAIN; [ "$k" = var ] && d=$VAR
  TANDEM_CUDA_KERNELS=$d timeout -s KILL 60 "$G/tandem-gpu-bench" bench --shape llama3-8b \
    --only decode --quick > "$O/decode-$k.md" 2>&1; el "decode $k" $?
done
for f in "$O"/rows-*.md; do echo "== $f"; grep -E "^\| (1|8|64) \|" "$f"; done
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\|" "$f" | head -12; done
