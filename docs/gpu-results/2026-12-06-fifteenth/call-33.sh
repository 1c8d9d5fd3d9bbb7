#!/usr/bin/env bash
# Device call 33 (written in the sixteenth session; ran in the eighteenth on call 31's warm
# H100, 310 s, raw output in call-33/, as
#   sed -i 's/step gpu-tests 150/step gpu-tests 215/; s/for r in 1 2; do/for r in 1; do/' call-33.sh
#   DEADLINE_S=590 bash call-33.sh
# (the cold machine's GPU tests had taken 201 s in call 31; one round of each loop to fit the
# device time left); carry .gpu33): norm-rows-in-registers.patch, beside this script now
# (superseded by scripts/gpu-pending/norm-many-rows.patch, call 34). The RMSNorm kernel ran with blocks
# of 1024 threads, one 16-byte load a thread, the row read twice (before and after the
# block's sum): at an 8k prefill chunk the input norm took 87.7 us a layer, 68% of the
# H100's copy rate (call 28), 2 blocks a multiprocessor. The patch sizes the block to
# hidden/16 threads (256 for the 8B shape), each holding its four loads in registers (one
# read of the row, 5 blocks a multiprocessor). Decode b1 runs the norm as one block,
# where its latency counts.
# 1. The GPU tests with the patch (the CPU comparisons check the norms' output).
# 2. `kernels` with main and the patch taking turns twice: the two norms' us a layer at
#    b1, b64/4k, b256 and in the prefill chunks.
# 3. The 8B decode at b1/b256 with each, then the 8B prefill with each taking turns twice.
# Carry .gpu33 (`WHICH=33 bash scripts/gpu-pending/prepare.sh`). DEADLINE_S (580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c33
M=$PWD/.gpu33/main P=$PWD/.gpu33/norm
unxz_to /tmp/gm .gpu33/main/tandem-gpu-bench.xz
unxz_to /tmp/gp .gpu33/norm/tandem-gpu-bench.xz .gpu33/norm/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c33.tgz" c33; }
bin() { if [ "$1" = norm ]; then echo "/tmp/gp/tandem-gpu-bench $P/kernels"; else echo "/tmp/gm/tandem-gpu-bench $M/kernels"; fi; }
date -u +%T.%N; step gpu-tests 150 "$P/kernels" /tmp/gp/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test result|FAILED|panicked" "$O/gpu-tests.md" | cut -c1-300; save
for r in 1 2; do
  for v in main norm; do
    set -- $(bin $v)
    date -u +%T.%N; step "kernels-$v-$r" 45 "$2" "$1" kernels --shape llama3-8b
    grep -E "^Kernel by kernel|^\| (input norm|post-attention norm) \|" "$O/kernels-$v-$r.md" | cut -c1-120; save
  done
done
for v in main norm; do
  set -- $(bin $v)
  date -u +%T.%N; step "decode-$v" 80 "$2" "$1" bench --shape llama3-8b --only decode --batches 1,256
  grep -E "^Floor|^\| (1024|4096) \| (1|256) \|" "$O/decode-$v.md" | cut -c1-200; save
done
for r in 1 2; do
  for v in main norm; do
    set -- $(bin $v)
    date -u +%T.%N; step "prefill-$v-$r" 45 "$2" "$1" bench --shape llama3-8b --only prefill
    grep -E "^\| (1024|8192|32768) \| [0-9.]+ \|" "$O/prefill-$v-$r.md"; save
  done
done
date -u +%T.%N
smi_stop
save
