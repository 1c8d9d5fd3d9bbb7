#!/usr/bin/env bash
# kv_bench with quinn's stock GSO batches (at most 10 datagrams per send call)
# against the vendored quinn's (as many as fit 64 KiB: 44 at 1472 bytes), the
# two binaries taking turns, ROUNDS rounds: 4096 tokens, QUIC over 1 and 2
# connections, TCP over 1, at 1472- and 8952-byte datagrams.
#   OLD: kv_bench of 8b4e76d (stock quinn 0.11.12)
#   NEW: kv_bench of this tree (third_party/quinn)
# CARGO_TARGET_DIR=/work/target-kvnew cargo build --release -p tandem-kv-transfer --bin kv_bench
set -u
cd "$(dirname "$0")"
OLD=${OLD:?kv_bench of 8b4e76d} NEW=${NEW:-/work/target-kvnew/release/kv_bench}
mkdir -p raw
for r in $(seq 1 "${ROUNDS:-3}"); do
  for v in old new; do
    b=$OLD; [ "$v" = new ] && b=$NEW
    "$b" --tokens 4096 --conns 1,2 --tcp-conns 1 --rx-endpoints 0 --max-udp-payload 1472,8952 \
      --ack-threshold 20 --overlap-tokens 0 > "raw/$v-$r.log" 2>&1
    grep -E "^\| [0-9]" "raw/$v-$r.log" | sed "s/^/$v round $r /"
    grep -E "quic conns|datagrams/send" "raw/$v-$r.log" | sed "s/^ */    /" | cut -c1-170
  done
done
