#!/usr/bin/env bash
# Device call 38 (nineteenth session, on the H100 left warm after a try for an H200; 53 s,
# carry .gpu35): call 35's split sweep at the aims around its winner on the H100 (2048):
# 1024, 1536, 2048 and 3072 blocks against the rule, three rounds taking turns.
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c38
unxz_to /tmp/gm .gpu35/tandem-gpu-bench.xz
env_line
TANDEM_CUDA_KERNELS=$PWD/.gpu35/kernels timeout 100 /tmp/gm/tandem-gpu-bench kernels \
  --shape llama3-8b --decode-blocks 1024,1536,2048,3072 | tee "$O/sweep.md"
