#!/usr/bin/env bash
# QUIC against plain TCP and against TCP under TLS 1.3 (rustls, the QUIC transport's
# provider and AES-128-GCM), kv_bench on this machine, 3 rounds; output in raw/.
set -euo pipefail
cd "$(dirname "$0")"
BIN=${KV_BENCH:-../../../target/release/kv_bench}
mkdir -p raw
for r in 1 2 3; do
  "$BIN" --tokens 4096 --conns 2 --tcp-conns 1,2 --rx-endpoints 0 --max-udp-payload 8952,1472 \
    --overlap-tokens 0 --tls > "raw/round-$r.txt" 2>&1
  grep -E "^\| [0-9]" "raw/round-$r.txt"
done
