#!/usr/bin/env bash
# kv_bench with glibc keeping freed memory (the default since this change,
# tandem_kv_transfer::memory) and without (TANDEM_KEEP_FREED_MEMORY=0), taking
# turns, ROUNDS rounds, at 1472- and 8952-byte datagrams: 4096 tokens (0.5 GiB),
# QUIC and TCP over 2 connections each. Prints one line a run: round, policy, then
# kv_bench's row (max UDP payload, tokens, best TCP, best QUIC, QUIC/TCP, setting,
# CPU s/GB TCP and QUIC). B: the kv_bench binary (release).
set -u
B=${B:-target/release/kv_bench}
for r in $(seq 1 "${ROUNDS:-3}"); do
  for keep in 1 0; do
    for p in 1472 8952; do
      row=$(TANDEM_KEEP_FREED_MEMORY=$keep "$B" --tokens 4096 --conns 2 --tcp-conns 2 \
        --max-udp-payload "$p" --rx-endpoints 0 --overlap-tokens 0 2>&1 | grep -E "^\| $p \|")
      echo "$r keep=$keep $row"
    done
  done
done
