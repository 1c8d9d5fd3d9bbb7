#!/usr/bin/env bash
# Kernel variants waiting for device time: each scripts/gpu-variants/NAME.patch
# (a diff of engine/src/cuda/kernels against the checkout) becomes the
# directory $GPU_DIR/var/NAME holding the checkout's kernel files with the patch
# applied. Run here, before carrying $GPU_DIR to the GPU machine; there,
# `STEPS=variants` (scripts/gpu_kernels.sh, decode) or scripts/gpu_ws_probe.sh
# (prefill attention: bit-identity against the mma.sync kernel and speed) runs
# each directory's kernels without a rebuild (TANDEM_CUDA_KERNELS).
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=${GPU_DIR:-.gpu}
for p in scripts/gpu-variants/*.patch; do
  name=$(basename "$p" .patch)
  d=$GPU_DIR/var/$name
  rm -rf "$d" && mkdir -p "$d" && cp engine/src/cuda/kernels/* "$d/"
  # Paths in the patch are engine/src/cuda/kernels/FILE: strip to FILE.
  patch -s -p5 -d "$d" < "$p"
  echo "$d"
done
