#!/usr/bin/env bash
# Device call 4 of the tenth session (issue 15, on the H200 of calls 1-3): two more
# decode sweeps and one more prefill of main, for medians and ranges over three runs
# (call 2 = the eighth session's call-e.sh gave one decode sweep of main, call 1 two
# prefills). Carry .gpu14 (main/). DEADLINE_S (580).
set -u
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c4
MK=$PWD/.gpu14/main/kernels
unxz_to /tmp/g14 .gpu14/main/tandem-gpu-bench.xz
env_line
step decode-main-2 110 "$MK" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode
step prefill-3 90 "$MK" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only prefill
step decode-main-3 110 "$MK" /tmp/g14/tandem-gpu-bench bench --shape llama3-8b --only decode
for f in "$O"/decode-*.md; do echo "== $f"; grep -E "^\| (1024|4096) \| (1|8|64|256) \||copy|floor" "$f" | head -12; done
for f in "$O"/prefill-*.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \|" "$f"; done
