#!/usr/bin/env bash
# QUIC vs TCP KV transfer at the three datagram sizes that matter, side by
# side in one run of kv_bench (kv-transfer/src/bin/kv_bench.rs): 1472 (a
# plain 1500-byte MTU), 8952 (9000-byte jumbo frames over IPv6) and 65527
# (loopback's largest). For the 16-core GPU host; writes one Markdown table
# to $OUT/kv_bench_mtu.md and the raw output to $OUT/kv_bench_mtu.log.
#
# Usage: scripts/kv_bench_mtu.sh [path/to/kv_bench] [extra kv_bench flags]
#   KV_BENCH=path  the binary (default: target/release/kv_bench, built with
#                  `cargo build --release -p tandem-kv-transfer --bin kv_bench`
#                  when missing)
#   OUT=dir        where the table and log go (default: ./kv_bench_out)
#   TOKENS, CONNS, TCP_CONNS, OVERLAP_TOKENS, MTUS  override the run's sizes
#                  (defaults below; OVERLAP_TOKENS=0 skips the overlap runs;
#                  MTUS lists the datagram bounds)
#
# Each size runs TCP with 4 and 8 connections, then QUIC with 8 and 16
# connections (one receiver endpoint per connection) at the ACK-frequency
# thresholds 1 (QUIC's own behaviour: an ACK every second packet) and 20
# (the TransportTuning default), 4k- and 32k-token KV of a Llama-3-8B shape.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-${KV_BENCH:-${CARGO_TARGET_DIR:-target}/release/kv_bench}}
shift || true
OUT=${OUT:-./kv_bench_out}
mkdir -p "$OUT"
if [ ! -x "$BIN" ]; then
    cargo build --release -p tandem-kv-transfer --bin kv_bench
    BIN=${CARGO_TARGET_DIR:-target}/release/kv_bench
fi
TABLE="$OUT/kv_bench_mtu.md"
TOKENS=${TOKENS:-4096,32768}
CONNS=${CONNS:-8,16}
TCP_CONNS=${TCP_CONNS:-4,8}
OVERLAP_TOKENS=${OVERLAP_TOKENS:-8192}
MTUS=${MTUS:-1472,8952,65527}
OVERLAP_CONNS=${CONNS##*,}
FLAGS=(--tokens "$TOKENS" --conns "$CONNS" --tcp-conns "$TCP_CONNS" --rx-endpoints 0
    --max-udp-payload "$MTUS" --ack-threshold 1,20
    --overlap-tokens "$OVERLAP_TOKENS" --overlap-conns "$OVERLAP_CONNS" --overlap-chunk-tokens 0,2048)
{
    echo "## kv_bench: QUIC vs TCP by datagram size ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs))"
    echo
    echo "\`$BIN ${FLAGS[*]} $*\`"
    echo
} > "$TABLE"
"$BIN" "${FLAGS[@]}" --markdown "$TABLE" "$@" 2>&1 | tee "$OUT/kv_bench_mtu.log"
echo "table: $TABLE"
