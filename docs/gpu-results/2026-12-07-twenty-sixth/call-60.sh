#!/usr/bin/env bash
# Device call 60 (twenty-sixth session; ~80 s, no GPU needed, the 16-core host; carry .gpu60,
# `WHICH=60 bash scripts/gpu-pending/prepare.sh`; ran on an H100 machine, raw output in call-60/):
# QUIC's receive path without quinn's copy of every received batch (issue 16's transport
# targets: 0.75 of TCP at 8952-byte datagrams, 0.5 at 1472). kv_bench, 32k tokens, the
# builds taking turns, 3 rounds at 8952 B and 2 at 1472 B (main and zc only):
#   main  HEAD before the change (third_party/quinn copies each batch into a new BytesMut)
#   zc    the change: batches received into pooled buffers and handed on as they are
#   lanes zc with the twenty-third session's kv-lanes.patch (each endpoint's quinn drivers
#         on one of 16 current-thread runtimes, TANDEM_KV_IO_THREADS=16; not on main)
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c60
unxz_to /tmp/g60 .gpu60/kv_bench_main.xz .gpu60/kv_bench_zc.xz .gpu60/kv_bench_lanes.xz
save() { tar -C "$OUT" -czf "$OUT/c60.tgz" c60; }
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep -E "^Model name|^CPU\(s\)"; } > "$O/env.txt" 2>&1
cat "$O/env.txt"
kv() { # NAME MTU BINARY [ENV..]
  local name=$1 mtu=$2 bin=$3; shift 3
  date -u +%T
  step "$name" 80 "" env "$@" /tmp/g60/$bin --tokens 32768 --conns 16,32 --tcp-conns 8,16 --rx-endpoints 0 \
    --max-udp-payload "$mtu" --overlap-tokens 0
  grep -E "tcp  conns|quic conns|best quic|kept as" "$O/$name.md" | sed 's/ack_threshold=20//' | cut -c1-130; save
}
for r in 1 2 3; do
  kv "main-8952-$r" 8952 kv_bench_main
  kv "zc-8952-$r" 8952 kv_bench_zc
  kv "lanes-8952-$r" 8952 kv_bench_lanes TANDEM_KV_IO_THREADS=16
done
for r in 1 2; do
  kv "zc-1472-$r" 1472 kv_bench_zc
  kv "main-1472-$r" 1472 kv_bench_main
done
save
