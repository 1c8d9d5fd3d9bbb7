#!/usr/bin/env bash
# Four requests at once over the same 2 QUIC connections, their streams sent
# in write order (TransportTuning::send_fairness = false, the default) or
# round-robin packet by packet (--fairness, quinn's default), ROUNDS rounds:
# the rate, each request's end, and how many frames the receiver kept as the
# packets' buffers. kv_bench of this tree.
set -u
cd "$(dirname "$0")/../../.."
B=${KV_BENCH:-target/release/kv_bench}
for r in $(seq 1 "${ROUNDS:-2}"); do
  for f in "" "--fairness"; do
    echo "== ${f:-write order} round $r"
    "$B" $f --concurrent 4 --tokens 2048 --conns 2 --tcp-conns 1 --rx-endpoints 0 \
      --max-udp-payload 1472,8952 --ack-threshold 20 --overlap-tokens 0 2>&1 \
      | grep -E "quic conns|requests at once|receiver: [0-9]"
  done
done
