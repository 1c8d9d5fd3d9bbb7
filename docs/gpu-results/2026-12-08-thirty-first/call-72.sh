#!/usr/bin/env bash
# Device call 72 (thirty-first session): what calls 69 and 71 run, from one folder built from
# one revision, so a session that finds the carried folders gone rebuilds one instead of three
# (carry .gpu72: `WHICH=72 bash scripts/gpu-pending/prepare.sh`, 2efd84e's tandem,
# tandem-gpu-bench, engine tests and kernels; its kernels and bench are a3fc187's, its
# tandem has decode.gpu_priority = "auto").
#   PART=15  issue 15's table (the twenty-third session's call-55.sh; H200 only, ~470 s)
#   PART=16  auto against high and normal under MPS (the thirtieth session's call-71.sh; any
#            card, ~520 s)
# Without PART: 15 on an H200, 16 on any other card. Run PART=16 second on a warm H200.
set -u
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
here=$(dirname "$0")
part=${PART:-}
if [ -z "$part" ]; then case "$name" in *H200*) part=15 ;; *) part=16 ;; esac; fi
case "$part" in
  15) C55=.gpu72 exec bash "$here/../2026-12-07-twenty-third/call-55.sh" ;;
  16) C71=.gpu72 exec bash "$here/../2026-12-07-thirtieth/call-71.sh" ;;
  *) echo "PART must be 15 or 16, not $part" >&2; exit 2 ;;
esac
