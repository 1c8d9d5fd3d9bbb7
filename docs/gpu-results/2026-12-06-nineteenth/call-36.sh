#!/usr/bin/env bash
# Device call 36 (nineteenth session; ~260 s, carry .gpu34 and .gpu36): call 34 again with
# the many-row norm as a kernel of its own. Call 34 (an H100) found norm-many-rows.patch
# correct and its prefill norms 87 -> 66-68 us a layer, but the norm at 256 decode rows
# 6.2-6.6 -> 7.6-8.0 us: the register path made the one kernel 38 registers a thread (main:
# 32), so a multiprocessor held one block of 1024 instead of two and 256 rows took two
# waves. Now `add_rmsnorm` is main's kernel (the same PTX) and `add_rmsnorm_rows` the
# register one, launched from NORM_MANY_ROWS (512) rows on.
# 1. The norm's GPU test (both kernels against the host), then the other GPU tests.
# 2. `kernels` with main and the change: the norms' us at b1, b64, b256 (must be main's)
#    and in the prefill chunks (must be call 34's new ones).
# 3. The 8B prefill with main and the change taking turns twice.
# Carry .gpu34 (main/: main's tandem-gpu-bench and kernels; `WHICH=34 bash
# scripts/gpu-pending/prepare.sh`) and .gpu36 (new/: this change's tandem-gpu-bench,
# engine-tests and kernels, xz). DEADLINE_S (290).
set -u
DEADLINE_S=${DEADLINE_S:-290}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c36
M=$PWD/.gpu34/main P=$PWD/.gpu36/new
unxz_to /tmp/gm .gpu34/main/tandem-gpu-bench.xz
unxz_to /tmp/gp .gpu36/new/tandem-gpu-bench.xz .gpu36/new/engine-tests.xz
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c36.tgz" c36; }
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
