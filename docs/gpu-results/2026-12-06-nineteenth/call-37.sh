#!/usr/bin/env bash
# Device call 37 (nineteenth session, ran on the H100 that call 36 left warm; 230 s, carry
# .gpu30 and .gpu36): issue 15's table with the many-row norm kernel (norm-rows-kernel.patch,
# now on main): call 18's script (3 prefill runs with transformers SDPA between, decode
# sweeps) on .gpu36's binary and kernels, with DEADLINE_S 290, so one decode sweep of
# three ran.
DEADLINE_S=${DEADLINE_S:-290} G=.gpu30 TAG=c37 BIN_XZ=.gpu36/new/tandem-gpu-bench.xz \
  KERN=$PWD/.gpu36/new/kernels exec bash "$(dirname "$0")/../2026-12-06-thirteenth/call-18.sh"
