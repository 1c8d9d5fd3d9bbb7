#!/usr/bin/env bash
# Device call 51 (twenty-third session; ~420 s, an H200 preferred; carry .gpu46, .gpu47,
# .gpu48, .gpu49): the decisive parts of calls 49 and 50 in one call, for a session whose
# device time went on starts that found no machine.
# 1. `bench --only prefill`: main (chunks of 8192), then both prefill patches.
# 2. Every GPU test with both patches (what landing them needs).
# 3. main's 32k prompt in one pass (`--prefill-chunk 32768`).
# 4. kv_bench at 8952 B on the host's 16 cores: QUIC against TCP and TLS over TCP.
# 5. perf over QUIC's runs (call 50's step 4).
# DEADLINE_S (420) trims the tail.
set -u
DEADLINE_S=${DEADLINE_S:-420}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c51
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz .gpu47/engine-tests.xz
unxz_to /tmp/g48 .gpu48/tandem-gpu-bench.xz
unxz_to /tmp/g49 .gpu49/kv_bench_main.xz
M=$PWD/.gpu46/kernels B=$PWD/.gpu47/kernels-both
env_line
{ lscpu; nproc; } > "$O/lscpu.txt" 2>&1
grep -E "^Model name|^Thread|^Core|^Socket|^CPU\(s\)" "$O/lscpu.txt" | cut -c1-100
smi_start
save() { tar -C "$OUT" -czf "$OUT/c51.tgz" c51; }
prefill() { # NAME KERNELS BINARY [ARGS..]
  local name=$1 k=$2 b=$3; shift 3
  date -u +%T; step "$name" 60 "$k" "$b" bench --shape llama3-8b --only prefill "$@"
  grep -E "^\| (1024|8192|32768) \|" "$O/$name.md" | cut -c1-90; save
}
prefill prefill-main-1 "$M" /tmp/g48/tandem-gpu-bench
prefill prefill-both-1 "$B" /tmp/g47/tandem-gpu-bench
date -u +%T; step gpu-tests 150 "$B" /tmp/g47/engine-tests --ignored cuda:: --test-threads 1
grep -E "FAILED|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
prefill prefill-onepass-1 "$M" /tmp/g48/tandem-gpu-bench --prefill-chunk 32768
smi_stop
date -u +%T; step kv-8952 90 "" /tmp/g49/kv_bench_main --tokens 32768 --conns 16,32 \
  --tcp-conns 8,16 --tls --rx-endpoints 0 --max-udp-payload 8952 --overlap-tokens 0
grep -E "tcp  conns|tls  conns|quic conns|best quic" "$O/kv-8952.md" | cut -c1-130; save
tar -C /tmp/g49 -xJf .gpu49/perf.tar.xz
P="/tmp/g49/perf/ld-linux-x86-64.so.2 --library-path /tmp/g49/perf /tmp/g49/perf/perf"
date -u +%T; step perf-record 60 "" $P record -F 499 -o /tmp/g49/q.data -- /tmp/g49/kv_bench_sym \
  --tokens 32768 --conns 32 --tcp-conns 8 --rx-endpoints 0 --max-udp-payload 8952 --overlap-tokens 0
tail -2 "$O/perf-record.md"
$P script -i /tmp/g49/q.data -F time,comm,ip,sym,dso 2>/dev/null | python3 scripts/perf_window.py 40 > "$O/perf-8952.md" 2>&1
head -14 "$O/perf-8952.md"
prefill prefill-both-2 "$B" /tmp/g47/tandem-gpu-bench
prefill prefill-main-2 "$M" /tmp/g48/tandem-gpu-bench
save
