#!/usr/bin/env bash
# AES-GCM from aws-lc-rs instead of ring for the KV transport's QUIC (kv-transfer/src/tls.rs):
# kv_bench on this machine, the build before (OLD, ring) and after (NEW, aws-lc-rs) taking
# turns, ROUNDS (6) rounds at 8952-byte datagrams (16k tokens, 2 GiB) and at 1472 (8k
# tokens); 2 QUIC and 2 TCP connections; output in $RAW (raw/), a summary on stdout.
# Then the per-packet cipher cost of both libraries on one thread (`aesb/`).
#   OLD=/path/to/kv_bench NEW=/path/to/kv_bench bash run.sh
set -euo pipefail
cd "$(dirname "$0")"
R=${RAW:-raw}; mkdir -p "$R"
ROUNDS=${ROUNDS:-6}
run() { # NAME ROUND MTU TOKENS BINARY
  "$5" --tokens "$4" --conns 2 --tcp-conns 2 --rx-endpoints 0 --max-udp-payload "$3" \
    --overlap-tokens 0 > "$R/$1-$3-$2.txt" 2>&1
  printf '%-4s %s %5s: ' "$1" "$2" "$3"; grep -E "quic conns" "$R/$1-$3-$2.txt" | cut -c50-200
}
for r in $(seq 1 "$ROUNDS"); do
  run old "$r" 8952 16384 "$OLD"; run new "$r" 8952 16384 "$NEW"
  run new "$r" 1472 8192 "$NEW"; run old "$r" 1472 8192 "$OLD"
done
CARGO_TARGET_DIR=${AESB_TARGET:-/tmp/aesb-target} cargo build -q --release --manifest-path aesb/Cargo.toml
for i in 1 2; do "${AESB_TARGET:-/tmp/aesb-target}/release/aesb"; done | tee "$R/aesb.txt"
