#!/usr/bin/env bash
# Device call 30 (sixteenth session; ~80 s, carry .gpu30 with k/U): call 27's Nsight Compute
# profile again, on the kernels with the uniform wgmma descriptors (7e67fc5, k/U = this
# checkout's kernels), for the next step: `--set full` with source
# counters on the 32k prompt's last 8192-token chunk (launch 44), details and SASS pages.
TAG=c30 KDIR=U SKIPS=44 LAUNCHES=0 exec bash "$(dirname "$0")/call-27.sh"
