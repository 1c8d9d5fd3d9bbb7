#!/usr/bin/env bash
# Device call B (issue 15, eighth session; on the card of call A): cuBLAS through torch
# on the 8B products (gemm_probe.py, beside call A's `kernels` table), then the 8B
# prefill of main (TMA) and transformers SDPA in the same call, taking turns.
# Carry .gpu13. DEADLINE_S (580).
set -u
D=$(dirname "$0")
source "$D/common.sh" b
G=/tmp/gpu13 K=$PWD/.gpu13/kernels
unxz_to "$G" .gpu13/tandem-gpu-bench.xz
env_line
step gemm 60 "" /opt/torch/.venv/bin/python "$D/gemm_probe.py"
cat "$O/gemm.md"
step prefill-1 90 "$K" "$G/tandem-gpu-bench" bench --shape llama3-8b --only prefill
step torch 120 "" /opt/torch/.venv/bin/python .gpu13/hf_reference.py baseline --prefill 8192,32768 --runs 3 --decode ""
step prefill-2 90 "$K" "$G/tandem-gpu-bench" bench --shape llama3-8b --only prefill
for f in "$O"/prefill-*.md "$O"/torch.md; do echo "== $f"; grep -E "^\| (1024|8192|32768) \||^\| prefill" "$f"; done
