#!/usr/bin/env bash
# CPU A/B of the zero-copy receive path and unchecked frames, end to end
# (scripts/cpu_up_ab.sh): before: release build of ff5b012; after: of fd5ff7c.
# Run from a directory with a models/ link to the repo's models/ (here /tmp/ab).
OUT=${OUT:-/tmp/ab/zc} exec "$(dirname "$0")/../../../../scripts/cpu_up_ab.sh" \
  /work/bench-bin/tandem-zc-before /work/bench-bin/tandem-zc-after
