#!/usr/bin/env bash
# Device call 70 (twenty-ninth session, not run yet; no GPU needed, the 16-core host of any
# device machine, ~120 s; carry .gpu70, `WHICH=70 bash scripts/gpu-pending/prepare.sh`):
# the KV transport's AES-GCM from aws-lc-rs instead of ring (issue 16's transport targets:
# 0.75 of TCP at 8952-byte datagrams, 0.5 at 1472). On the 2-core VM aws-lc-rs seals an
# 8900-byte packet in 0.63-0.72 of ring's time and a 1400-byte one in about the same
# (docs/cpu-results/2026-12-07-aws-lc/), but whole transfers there were within the VM's
# spread. kv_bench, 32k tokens, 16 and 32 connections, the builds taking turns, 3 rounds at
# 8952 bytes and 3 at 1472:
#   ring   c6efb50 (main)
#   awslc  c6efb50 with docs/cpu-results/2026-12-07-aws-lc/kv-awslc.patch
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c70
unxz_to /tmp/g70 .gpu70/kv_bench_ring.xz .gpu70/kv_bench_awslc.xz
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep -E "^Model name|^CPU\(s\)"; } > "$O/env.txt" 2>&1
cat "$O/env.txt"
kv() { # NAME MTU BINARY
  date -u +%T
  step "$1" 80 "" /tmp/g70/$3 --tokens 32768 --conns 16,32 --tcp-conns 8,16 --rx-endpoints 0 \
    --max-udp-payload "$2" --overlap-tokens 0
  grep -E "tcp  conns|quic conns|best quic" "$O/$1.md" | sed 's/ack_threshold=20//' | cut -c1-130
}
for r in 1 2 3; do
  kv "ring-8952-$r" 8952 kv_bench_ring
  kv "awslc-8952-$r" 8952 kv_bench_awslc
  kv "awslc-1472-$r" 1472 kv_bench_awslc
  kv "ring-1472-$r" 1472 kv_bench_ring
done
# One summary file comes back: every run's QUIC and TCP lines.
grep -H -E "quic conns|tcp  conns|best quic" "$O"/*.md | sed "s|$O/||" > "$O/summary.txt"
find "$O" -name '*.md' -delete
