#!/usr/bin/env bash
# Device call 3 of the tenth session (issue 16; the 16-core host, the GPU is not used):
# kv_bench of this tree (freed memory kept, the eighth session's change) against the
# same binary with TANDEM_KEEP_FREED_MEMORY=0, taking turns, QUIC vs TCP at 1472 and
# 8952-byte datagrams, 16 and 32 QUIC connections. Carry .gpu10 (WHICH=10).
# DEADLINE_S (default 330): a run that might not end within it is skipped.
set -u
O=${OUT:-/tmp/out}/kv; mkdir -p "$O"
t0=$(date +%s)
run() { # name keep
  [ $(( $(date +%s) - t0 + 150 )) -lt "${DEADLINE_S:-330}" ] || { echo "$1: skipped (time)"; return; }
  TANDEM_KEEP_FREED_MEMORY=$2 OUT=$O/$1 MTUS=1472,8952 CONNS=16,32 OVERLAP_TOKENS=0 \
    timeout -s KILL 150 bash scripts/kv_bench_mtu.sh .gpu10/kv_bench_new > "$O/$1.out" 2>&1
  echo "$1 rc=$? at $(( $(date +%s) - t0 )) s"
}
run kept-1 1
run not-kept-1 0
run kept-2 1
run not-kept-2 0
for v in kept-1 not-kept-1 kept-2 not-kept-2; do
  [ -f "$O/$v/kv_bench_mtu.md" ] && { echo "== $v"; grep -E "^\| [0-9]" "$O/$v/kv_bench_mtu.md"; }
done
