#!/usr/bin/env bash
# Device call 32 (written in the sixteenth session, not yet run; ~580 s, kind nvidia-h200,
# carry .gpu30): issue 15's whole table with the uniform wgmma descriptors (7e67fc5), ideally
# on an H200: call 18's script (3 prefill runs with transformers SDPA between, 3 decode
# sweeps at b1/b64/b256, clocks logged) on .gpu30's binary with its kernels (k/U): since the
# nineteenth session `WHICH=h bash scripts/gpu-pending/prepare.sh` builds both from the
# checkout (main with the uniform descriptors and the many-row norm kernel).
G=.gpu30 TAG=c32 BIN_XZ=.gpu30/tandem-gpu-bench.xz KERN=$PWD/.gpu30/k/U \
  exec bash "$(dirname "$0")/../2026-12-06-thirteenth/call-18.sh"
