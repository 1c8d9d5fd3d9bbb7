#!/usr/bin/env bash
# quinn's receive without the copy of every batch (third_party/quinn/TANDEM.md): kv_bench
# on this machine, the build before (OLD) and after (NEW) taking turns, 5 rounds at
# 8952-byte datagrams (16k tokens, 2 GiB) and 3 at 1472 (8k tokens); output in $RAW (raw/).
#   OLD=/path/to/kv_bench NEW=/path/to/kv_bench bash run.sh
set -euo pipefail
cd "$(dirname "$0")"
R=${RAW:-raw}; mkdir -p "$R"
run() { # NAME ROUND MTU TOKENS BINARY
  "$5" --tokens "$4" --conns 2 --tcp-conns 2 --rx-endpoints 0 --max-udp-payload "$3" \
    --overlap-tokens 0 > "$R/$1-$3-$2.txt" 2>&1
  printf '%-4s %s %5s: ' "$1" "$2" "$3"; grep -E "quic conns" "$R/$1-$3-$2.txt" | cut -c50-200
}
for r in 1 2 3 4 5; do run old "$r" 8952 16384 "$OLD"; run new "$r" 8952 16384 "$NEW"; done
for r in 1 2 3; do run new "$r" 1472 8192 "$NEW"; run old "$r" 1472 8192 "$OLD"; done
