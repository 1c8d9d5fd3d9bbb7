#!/usr/bin/env bash
# CPU A/B of the first-token-ahead + import-slice changes, end to end
# (scripts/cpu_up_ab.sh; this run used its loop before it became that script):
# before: target/release/tandem of d40189c (the last release build before these
# changes); after: ab079a1. Run from a directory with a models/ link to the
# repo's models/ (here /tmp/ab).
OUT=${OUT:-/tmp/ab/out} exec "$(dirname "$0")/../../../scripts/cpu_up_ab.sh" \
  /work/bench-bin/tandem-before /work/bench-bin/tandem-after
