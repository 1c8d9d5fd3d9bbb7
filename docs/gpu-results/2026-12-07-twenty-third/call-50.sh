#!/usr/bin/env bash
# Device call 50 (twenty-third session; ~150 s, no GPU needed, the 16-core host; carry
# .gpu49): what QUIC's CPU per GB is made of on the host, where it costs 1.27 s/GB against
# 0.8-0.9 on the 2-core VM (issue 16's transport targets: 0.75 of TCP at 8952 B, 0.5 at 1472).
# 1. lscpu: are the 16 CPUs 8 cores with two threads each?
# 2. aesb: AES-128-GCM seal/open, ring against aws-lc-rs, 1 thread and every CPU.
# 3. kv_bench at 8952 then 1472 B, 32k tokens, the builds taking turns, 2 rounds:
#    main (with --tls: TCP under rustls's TLS 1.3 too, the baseline that encrypts as QUIC
#    does); lanes (each endpoint's quinn drivers on one of N current-thread runtimes,
#    TANDEM_KV_IO_THREADS=8 or 16); awslc (rustls and quinn on aws-lc-rs, not ring).
# 4. perf (Debian 12's, carried with its libraries) over main's QUIC runs at 8952 B:
#    the CPU by group (kernel, crypto, copies, quinn) against the 2-core VM's
#    (scripts/perf_window.py), if the host lets perf sample.
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c50
unxz_to /tmp/g49 .gpu49/kv_bench_main.xz .gpu49/kv_bench_lanes.xz .gpu49/kv_bench_awslc.xz .gpu49/aesb.xz
save() { tar -C "$OUT" -czf "$OUT/c50.tgz" c50; }
{ lscpu; nproc; cat /proc/meminfo | head -3; } > "$O/lscpu.txt" 2>&1
grep -E "^Model name|^Thread|^Core|^Socket|^CPU\(s\)|^NUMA node\(s\)|MHz|^Flags" "$O/lscpu.txt" | cut -c1-120
grep -o -w -E "vaes|vpclmulqdq|avx512f|avx512vl" "$O/lscpu.txt" | sort -u | tr '\n' ' '; echo
tar -C /tmp/g49 -xJf .gpu49/perf.tar.xz
P="/tmp/g49/perf/ld-linux-x86-64.so.2 --library-path /tmp/g49/perf /tmp/g49/perf/perf"
date -u +%T; step perf-record 90 "" $P record -F 499 -o /tmp/g49/q.data -- /tmp/g49/kv_bench_sym \
  --tokens 32768 --conns 32,32 --tcp-conns 8 --rx-endpoints 0 --max-udp-payload 8952 --overlap-tokens 0
tail -3 "$O/perf-record.md"
$P script -i /tmp/g49/q.data -F time,comm,ip,sym,dso 2>/dev/null | python3 scripts/perf_window.py 40 > "$O/perf-8952.md" 2>&1
head -14 "$O/perf-8952.md"; save
step aesb 40 "" /tmp/g49/aesb; cat "$O/aesb.md"; save
kv() { # NAME MTU BINARY [ENV..]; TCP_CONNS (8), KV_EXTRA: more kv_bench flags
  local name=$1 mtu=$2 bin=$3; shift 3
  date -u +%T
  step "$name" 90 "" env "$@" /tmp/g49/$bin --tokens 32768 --conns 16,32 --tcp-conns ${TCP_CONNS:-8} \
    --rx-endpoints 0 --max-udp-payload "$mtu" --overlap-tokens 0 ${KV_EXTRA:-}
  grep -E "tcp  conns|tls  conns|quic conns|best quic" "$O/$name.md" | sed 's/ack_threshold=20//' | cut -c1-130; save
}
for r in 1 2; do
  TCP_CONNS=8,16 KV_EXTRA=--tls kv "main-8952-$r" 8952 kv_bench_main
  kv "lanes8-8952-$r" 8952 kv_bench_lanes TANDEM_KV_IO_THREADS=8
  kv "lanes16-8952-$r" 8952 kv_bench_lanes TANDEM_KV_IO_THREADS=16
  kv "awslc-8952-$r" 8952 kv_bench_awslc
done
TCP_CONNS=8,16 KV_EXTRA=--tls kv "main-1472-1" 1472 kv_bench_main
kv "lanes16-1472-1" 1472 kv_bench_lanes TANDEM_KV_IO_THREADS=16
kv "awslc-1472-1" 1472 kv_bench_awslc
save
