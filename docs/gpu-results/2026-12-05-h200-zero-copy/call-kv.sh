#!/usr/bin/env bash
# Device call (16-core host; the GPU is not used): QUIC vs TCP at 1472- and
# 8952-byte datagrams, kv_bench of ff5b012 (old: the receiver copies every
# packet into one buffer; every frame checksummed), of 8b4e76d (zc: the
# payload kept as the packets' buffers; no checksum unless asked; it also
# reports the CPU seconds per GB of each run) and of the tree with the vendored
# quinn (new: zc with GSO batches of up to 64 KiB, 44 datagrams per call at
# 1472 bytes instead of 10), and zc with --checksum (frames checksummed over QUIC
# and TCP alike, as old), taking turns; then 4 requests at once with the
# streams in write order and round-robin.
# Carry .gpu10 (the three stripped kv_bench binaries: scripts/gpu-pending/prepare.sh).
set -u
O=${OUT:-/tmp/out}/kv; mkdir -p "$O"
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
# RUNS picks runs (default all: old zc new zc-checksum concurrent).
RUNS=" ${RUNS:-old zc new zc-checksum concurrent} "
run() { # name binary [flags]
  local name=$1 bin=$2; shift 2
  [[ $RUNS == *" $name "* ]] || return 0
  OUT=$O/$name MTUS=1472,8952 OVERLAP_TOKENS=0 timeout -s KILL 150 \
    bash scripts/kv_bench_mtu.sh "$bin" "$@" > "$O/$name.out" 2>&1; el "$name" $?
}
run old .gpu10/kv_bench_old
run zc .gpu10/kv_bench_zc
# 32 connections too: whether QUIC's rate still grows with connections (cores) there.
CONNS=8,16,32 run new .gpu10/kv_bench_new
run zc-checksum .gpu10/kv_bench_zc --checksum
# Four requests at once over 8 connections: streams in write order (default)
# or round-robin packet by packet (--fairness): frames kept, rate, each end.
for f in "" --fairness; do
  [[ $RUNS == *" concurrent "* ]] || continue
  [ $(( $(date +%s) - t0 )) -lt 440 ] || { echo "concurrent ${f:-write-order}: skipped (time)"; continue; }
  timeout -s KILL 60 .gpu10/kv_bench_new $f --concurrent 4 --tokens 4096 --conns 8 --tcp-conns 8 \
    --rx-endpoints 0 --max-udp-payload 1472,8952 --ack-threshold 20 --overlap-tokens 0 \
    > "$O/concurrent${f:+-fair}.out" 2>&1; el "concurrent ${f:-write-order}" $?
done
for v in old zc new zc-checksum; do [ -f "$O/$v/kv_bench_mtu.md" ] && { echo "== $v"; grep -E "^\|" "$O/$v/kv_bench_mtu.md"; }; done
grep -HE "quic conns|requests at once|receiver: [0-9]" "$O"/concurrent*.out
