#!/usr/bin/env bash
# Device call 5: 16 x 4k/128 at 1 req/s on one H200, both roles on GPU 0, three
# binaries side by side (carry .gpu9: xz-compressed `tandem` and the gpu-1p1d
# configs in old/, a/, b/):
#   old (d40189c): round 6's binary: the Final leaves once its last layer is queued
#   a   (5e2a889): the Final leaves as soon as the first token is sampled
#                  (FinalAhead), the decode engine takes it ahead of waiting imports
#   b   (4988d35): a + imports outside a step's device time limited to a slice
# old and a: disaggregated (two processes); b: disaggregated and colocated.
set -u
O=${OUT:-/tmp/out}/g; mkdir -p "$O"
export TANDEM_CUDA_KERNELS=$PWD/engine/src/cuda/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
for v in old a b; do
  mkdir -p /tmp/gpu9/$v && cp -r .gpu9/$v/gpu-1p1d /tmp/gpu9/$v/
  python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
    .gpu9/$v/tandem.xz /tmp/gpu9/$v/tandem && chmod +x /tmp/gpu9/$v/tandem
done
el unpacked 0
summary() { grep -E "^### |Median TTFT|Mean TTFT|P99 TTFT|prefill_compute|kv_send_tail|kv_import_tail|first_token \(|first_step \(|Median TPOT|Median ITL|P99 ITL" "$1"; }
# b first (the colocated reference is in its run), then old, then a.
RUST_LOG=info,tandem_decode=debug OUT=$O/b GPU_DIR=/tmp/gpu9/b SKIP512=1 RATES=1 N=16 \
  timeout -s KILL 150 bash scripts/gpu_ttft.sh > "$O/b.out" 2>&1; el b $?
pkill -9 -f /tmp/gpu9/b/tandem; sleep 1
for v in old a; do
  RUST_LOG=info,tandem_decode=debug OUT=$O/$v GPU_DIR=/tmp/gpu9/$v SKIP512=1 NOCOLO=1 RATES=1 N=16 \
    timeout -s KILL 90 bash scripts/gpu_ttft.sh > "$O/$v.out" 2>&1; el "$v" $?
  pkill -9 -f /tmp/gpu9/$v/tandem; sleep 1
done
for v in b old a; do echo "== $v"; summary "$O/$v/ttft.md"; done
