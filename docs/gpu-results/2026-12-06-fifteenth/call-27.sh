#!/usr/bin/env bash
# Device call 27 (sixteenth session; ~200 s, after call-25/26 on an H100): Nsight
# Compute on main's Hopper prefill attention as it is now (128-key tiles, TMA), the
# first profile since the table-prefetch step (docs/GPU_BENCH.md). Calls 25-26 found
# neither the wait-after-softmax fix nor split-K variants faster, and call 23's
# ablations put ~20% each on loads, softmax and ex2: the profile says which unit or
# stall holds the consumers.
# 1. Every prefill_attn launch of `attn --speed` (2 layers) with its time and block
#    size, to name the launches profiled below.
# 2. `--set full` with source counters on the wgmma kernel's 8192-token chunk after
#    24576 cached keys (layer 0: launch 44) and after 0 (launch 8); the details page and
#    the SASS page (stall samples per instruction) of each.
# Carry .gpu30. TAG, KDIR (a folder of .gpu30/k), SKIPS and LAUNCHES (0: no launch list)
# let call-30.sh run the same profile on other kernels.
set -u
TAG=${TAG:-c27} KDIR=${KDIR:-main} SKIPS=${SKIPS:-"44 8"} LAUNCHES=${LAUNCHES:-1}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" "$TAG"
K=$PWD/.gpu30/k/$KDIR
unxz_to /tmp/gm .gpu30/tandem-gpu-bench.xz
env_line
NCU=$(ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; "$NCU" --version | tail -1
save() { tar -C "$OUT" -czf "$OUT/$TAG.tgz" "$TAG"; }
export TANDEM_CUDA_KERNELS=$K
if [ "$LAUNCHES" = 1 ]; then
date -u +%T
timeout -s KILL 120 "$NCU" --clock-control none -k regex:prefill_attn -c 60 \
  --metrics gpu__time_duration.sum,launch__block_size,launch__grid_size \
  --csv /tmp/gm/tandem-gpu-bench attn --speed > "$O/launches.csv" 2> "$O/launches.err"
echo "launches rc=$?"
python3 - "$O/launches.csv" <<'PY' | tee "$O/launches.md"
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; i = h.index("ID"); m = h.index("Metric Name"); v = h.index("Metric Value")
by = {}
for r in rows[1:]:
    by.setdefault(r[i], {})[r[m]] = r[v]
for k in sorted(by, key=int):
    d = by[k]
    print(k, d.get("launch__block_size"), d.get("launch__grid_size"), d.get("gpu__time_duration.sum"))
PY
fi
save
for skip in $SKIPS; do
  date -u +%T
  timeout -s KILL 150 "$NCU" --clock-control none -k regex:prefill_attn --launch-skip "$skip" -c 1 \
    --set full --import-source no -o "$O/rep-$skip" -f /tmp/gm/tandem-gpu-bench attn --speed \
    > "$O/ncu-$skip.log" 2>&1
  echo "ncu $skip rc=$?"
  "$NCU" -i "$O/rep-$skip.ncu-rep" --page details > "$O/details-$skip.txt" 2>&1
  "$NCU" -i "$O/rep-$skip.ncu-rep" --page source --print-source sass --csv > "$O/sass-$skip.csv" 2>&1
  grep -E "Duration|Throughput|Pipe|Tensor|Hit Rate|Registers|Shared Memory Configuration|Block Size|Grid Size" \
    "$O/details-$skip.txt" | head -30
  python3 scripts/ncu_sass_summary.py "$O/sass-$skip.csv" > "$O/sass-$skip.md" 2>&1
  head -30 "$O/sass-$skip.md"
  xz -9 "$O/sass-$skip.csv"; rm -f "$O/rep-$skip.ncu-rep"
  save
done
date -u +%T
