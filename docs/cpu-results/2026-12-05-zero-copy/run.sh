#!/usr/bin/env bash
# QUIC vs TCP on this 2-core VM, kv_bench of ff5b012 (old: the receiver copies
# every packet into one buffer per frame; every frame checksummed) against
# d2c6701 (new: the payload kept as the packets' buffers; frames unchecked
# unless asked) and new with --checksum (frames checksummed over QUIC and TCP
# alike, as old did), taking turns, ROUNDS rounds. Binaries: .gpu10/kv_bench_old
# and .gpu10/kv_bench_new (stripped release builds of those commits).
set -u
cd "$(dirname "$0")/../../.."
O=${OUT:-docs/cpu-results/2026-12-05-zero-copy}
for r in $(seq 1 "${ROUNDS:-3}"); do
  for v in old new new-checksum; do
    bin=.gpu10/kv_bench_${v%-checksum}; flags=()
    [ "$v" = new-checksum ] && flags=(--checksum)
    OUT=$O/raw/$v-$r TOKENS=4096 CONNS=2 TCP_CONNS=1,2 MTUS=1472,8952 OVERLAP_TOKENS=0 \
      bash scripts/kv_bench_mtu.sh "$bin" "${flags[@]}" > /dev/null 2>&1
    grep -E "^\| [0-9]" "$O/raw/$v-$r/kv_bench_mtu.md" | sed "s/^/$v round $r /"
  done
done
