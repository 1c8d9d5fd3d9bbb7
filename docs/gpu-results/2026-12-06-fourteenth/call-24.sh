#!/usr/bin/env bash
# Device call 24 (written in the fourteenth session; not yet run): issue 15's table on
# an H200, whose figures are still the tenth session's. Call 18 asked for one and ran
# on the H100 already held: make this a session's FIRST call, kind `nvidia-h200`,
# timeout_s 600. It is call 18's script (3 prefill runs with transformers SDPA between,
# 3 decode sweeps at b1/b64/b256, clocks logged) on main after the landing (.gpu29/main:
# the 128-key tiles, blocks of 64, the residual epilogue and the tuned products, none
# yet run on an H200). Carry .gpu29 (`WHICH=29 bash scripts/gpu-pending/prepare.sh`).
G=.gpu29 TAG=c24 exec bash "$(dirname "$0")/../2026-12-06-thirteenth/call-18.sh"
