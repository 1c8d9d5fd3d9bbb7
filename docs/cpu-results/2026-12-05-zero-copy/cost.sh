#!/usr/bin/env bash
# What a GB of KV costs in CPU seconds (sender + receiver processes, from
# /proc) over QUIC and over TCP, at three datagram bounds, frames unchecked and
# checksummed, ROUNDS rounds: the per-byte and per-packet costs of the
# transport, which unlike the rate do not depend on how many cores are free.
# kv_bench of this tree (cargo build --release -p tandem-kv-transfer --bin kv_bench).
set -u
cd "$(dirname "$0")/../../.."
B=${KV_BENCH:-target/release/kv_bench}
O=${OUT:-docs/cpu-results/2026-12-05-zero-copy/cost}
mkdir -p "$O"
for r in $(seq 1 "${ROUNDS:-3}"); do
  for c in unchecked checksum; do
    flags=(); [ "$c" = checksum ] && flags=(--checksum)
    "$B" "${flags[@]}" --tokens 4096 --conns 2 --tcp-conns 2 --rx-endpoints 0 \
      --max-udp-payload 1472,8952,65527 --ack-threshold 20 --overlap-tokens 0 \
      > "$O/$c-$r.log" 2>&1
    grep -E "^\| [0-9]" "$O/$c-$r.log" | sed "s/^/$c round $r /"
  done
done
