#!/usr/bin/env bash
# Device call 49 (twenty-second session; ~500 s, an H200 preferred; carry .gpu46, .gpu47 and
# .gpu48): call 47's two prefill patches and call 48's one-pass 32k prompt in one call, for a
# session whose device time went on tries that found no machine. The most decisive first:
# 1. Every GPU test with both patches (.gpu47's engine-tests, kernels-both/).
# 2. `attn --layers 1` with both: the Hopper prefill attention against the portable one, both
#    on the new (head, tile, chunk) grid.
# 3. `attn --speed`: main, then prefill-heads-fastest.
# 4. `bench --only prefill`: main (chunks of 8192), both patches, main with the 32k prompt in
#    one pass (`--prefill-chunk 32768`).
# 5. `kernels`: main's kernels, then rope-kv-wide's (rope_kv alone in a decode step and in a
#    prefill pass).
# 6. `bench --only prefill` again: main, both.
# DEADLINE_S (560).
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c49
unxz_to /tmp/g47 .gpu47/tandem-gpu-bench.xz .gpu47/engine-tests.xz
unxz_to /tmp/g48 .gpu48/tandem-gpu-bench.xz
M=$PWD/.gpu46/kernels B=$PWD/.gpu47/kernels-both R=$PWD/.gpu47/kernels-rope
env_line
smi_start
save() { tar -C "$OUT" -czf "$OUT/c49.tgz" c49; }
prefill() { # NAME KERNELS BINARY [ARGS..]
  local name=$1 k=$2 b=$3; shift 3
  date -u +%T; step "$name" 60 "$k" "$b" bench --shape llama3-8b --only prefill "$@"
  grep -E "^\| (1024|8192|32768) \|" "$O/$name.md" | cut -c1-90; save
}
date -u +%T; step gpu-tests 150 "$B" /tmp/g47/engine-tests --ignored cuda:: --test-threads 1
grep -E "FAILED|^test result|panicked" "$O/gpu-tests.md" | cut -c1-200; save
date -u +%T; step attn-check 60 "$B" /tmp/g47/tandem-gpu-bench attn --layers 1
grep -E "^\||rror|panick" "$O/attn-check.md" | tail -12 | cut -c1-160; save
date -u +%T; step speed-main 40 "$M" /tmp/g48/tandem-gpu-bench attn --speed
grep -E "^\| " "$O/speed-main.md" | tail -4 | cut -c1-160
date -u +%T; step speed-heads 40 "$B" /tmp/g47/tandem-gpu-bench attn --speed
grep -E "^\| " "$O/speed-heads.md" | tail -4 | cut -c1-160; save
prefill prefill-main-1 "$M" /tmp/g48/tandem-gpu-bench
prefill prefill-both-1 "$B" /tmp/g47/tandem-gpu-bench
prefill prefill-onepass-1 "$M" /tmp/g48/tandem-gpu-bench --prefill-chunk 32768
for v in M R; do
  date -u +%T; step "kernels-$v" 60 "${!v}" /tmp/g48/tandem-gpu-bench kernels --shape llama3-8b
  grep -E "^\| rope_kv" "$O/kernels-$v.md"; save
done
prefill prefill-main-2 "$M" /tmp/g48/tandem-gpu-bench
prefill prefill-both-2 "$B" /tmp/g47/tandem-gpu-bench
prefill prefill-onepass-2 "$M" /tmp/g48/tandem-gpu-bench --prefill-chunk 32768
smi_stop
save
