#!/usr/bin/env bash
# Device call 34 (eighteenth session, not run: the device time was spent; ~260 s, carry
# .gpu34): the RMSNorm's register blocks for many rows only. Call 33 found
# norm-rows-in-registers.patch 22% faster per norm in a prefill chunk (87 -> 68 us a layer
# on an H100) and 1-1.5 us slower per norm at 1-256 rows (b1 step 5.61 -> 5.69 ms). Now a
# pass of NORM_MANY_ROWS (512) rows or more gets the patch's blocks and fewer keep main's
# blocks of 1024 (one load a thread, the row read twice, as main).
# 1. The new GPU test of the norm against the host (rows 1..2000, widths 576/4096/8192,
#    with and without delta and row map), then the other GPU tests as time allows.
# 2. `kernels` with main and the change: the norms' us at b1, b64, b256 (must be main's)
#    and in the prefill chunks (must be the patch's).
# 3. The 8B prefill with main and the change taking turns twice.
# Carry .gpu34 (`WHICH=34 bash scripts/gpu-pending/prepare.sh`): main/ (main's
# tandem-gpu-bench and kernels), new/ (scripts/gpu-pending/norm-many-rows.patch's
# tandem-gpu-bench, engine-tests and kernels). DEADLINE_S (290). TAG (c34) and NEW (.gpu34/new)
# let a later call run it on another change's folder (call-36.sh).
set -u
DEADLINE_S=${DEADLINE_S:-290} TAG=${TAG:-c34} NEW=${NEW:-.gpu34/new}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" "$TAG"
M=$PWD/.gpu34/main P=$PWD/$NEW
unxz_to /tmp/gm .gpu34/main/tandem-gpu-bench.xz
unxz_to /tmp/gp "$NEW/tandem-gpu-bench.xz" "$NEW/engine-tests.xz"
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/$TAG.tgz" "$TAG"; }
bin() { if [ "$1" = new ]; then echo "/tmp/gp/tandem-gpu-bench $P/kernels"; else echo "/tmp/gm/tandem-gpu-bench $M/kernels"; fi; }
date -u +%T; step norm-test 60 "$P/kernels" /tmp/gp/engine-tests --ignored cuda::check_norm --test-threads 1
grep -E "^test |^test result|panicked" "$O/norm-test.md" | cut -c1-300; save
for v in main new; do
  set -- $(bin $v)
  date -u +%T; step "kernels-$v" 40 "$2" "$1" kernels --shape llama3-8b
  grep -E "^Kernel by kernel|^\| (input norm|post-attention norm) \|" "$O/kernels-$v.md" | cut -c1-120; save
done
for r in 1 2; do
  for v in main new; do
    set -- $(bin $v)
    date -u +%T; step "prefill-$v-$r" 30 "$2" "$1" bench --shape llama3-8b --only prefill
    grep -E "^\| (1024|8192|32768) \| [0-9.]+ \|" "$O/prefill-$v-$r.md"; save
  done
done
date -u +%T; step gpu-tests $(( DEADLINE_S - ($(date +%s) - t0) - 5 )) "$P/kernels" /tmp/gp/engine-tests --ignored cuda:: --test-threads 1
grep -E "^test .*(ok|FAILED)$|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
smi_stop
save
