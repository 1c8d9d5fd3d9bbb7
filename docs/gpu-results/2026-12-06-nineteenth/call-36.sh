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
# engine-tests and kernels, xz). DEADLINE_S (290). It ran as a copy of call-34.sh with those
# folders; it is now that script with TAG and NEW set.
TAG=c36 NEW=.gpu36/new exec bash "$(dirname "$0")/../2026-12-06-eighteenth/call-34.sh"
