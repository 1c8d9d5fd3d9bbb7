#!/usr/bin/env bash
# Device call 35 (nineteenth session; ~200 s, carry .gpu35, meant for a warm H200 after
# call-32): Nsight Compute on decode attention at batch 256, 1k context. On the H200 it
# reads 1.07 GB a layer in 277 us (call 23: 3.87 TB/s, 91% of the 4231 GB/s copy and ~88%
# of the 4416 GB/s the lm_head gemv read), against 97-98% of the copy on an H100; b256 1k
# is 1.42x its floor there (target 1.4), and ~6% more from this kernel would meet it.
# 1. `kernels --decode-blocks 2048,6144,8192,12288`: decode_attn + attn_combine a layer and
#    the 4-layer step at b256 1k and b64 4k, the rule (4096 blocks at both) against aiming at
#    each N, three rounds taking turns: 10.3 waves of 396 leave a third of a wave in the
#    tail, 15.5 and 20.7 waves less of one, at the cost of shorter blocks and more merging.
# 2. The same sweep (aiming at 2048) under ncu, decode_attn only: launch index, grid and
#    duration (serialised: no launch gaps) of each of the first 120 (b256 1k: the rule's
#    eager profiles, then its graph steps, then 2048's), then killed.
# 3. `--set full` on the sixth b256 launch of the rule (after the first profile's): the
#    details page (throughput, memory chart, stall reasons, occupancy) and the SASS page.
# Carry .gpu35 (this checkout's tandem-gpu-bench, xz, and kernels). DEADLINE_S (240).
set -u
DEADLINE_S=${DEADLINE_S:-240}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c35
unxz_to /tmp/gm .gpu35/tandem-gpu-bench.xz
env_line
NCU=$(ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; "$NCU" --version | tail -1
save() { tar -C "$OUT" -czf "$OUT/c35.tgz" c35; }
export TANDEM_CUDA_KERNELS=$PWD/.gpu35/kernels
date -u +%T; step sweep 60 "" /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b --decode-blocks 2048,6144,8192,12288
grep -E "^##|^\| (1024|4096) " "$O/sweep.md"; save
date -u +%T
timeout -s KILL 120 "$NCU" --clock-control none -k regex:^decode_attn -c 120 --kill yes \
  --metrics gpu__time_duration.sum,launch__grid_dim_x,launch__grid_dim_z,dram__bytes_read.sum \
  --csv /tmp/gm/tandem-gpu-bench kernels --shape llama3-8b --decode-blocks 2048 > "$O/launches.csv" 2> "$O/launches.err"
echo "launches rc=$? at $(( $(date +%s) - t0 )) s"
python3 - "$O/launches.csv" > "$O/launches.md" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; i = h.index("ID"); m = h.index("Metric Name"); v = h.index("Metric Value")
u = h.index("Metric Unit")
by = {}
for r in rows[1:]:
    by.setdefault(int(r[i]), {})[r[m]] = (r[v].replace(",", ""), r[u])
print("| launch | splits | seqs | duration | DRAM read |")
print("|---|---|---|---|---|")
for k in sorted(by):
    d = by[k]
    f = lambda n: " ".join(d.get(n, ("", ""))).strip()
    print(f"| {k} | {f('launch__grid_dim_x')} | {f('launch__grid_dim_z')} | "
          f"{f('gpu__time_duration.sum')} | {f('dram__bytes_read.sum')} |")
PY
# The sweep's first launches are the rule's at b256 1k; the sixth is the second profile's.
IDX=$(awk -F'|' '$4+0 == 256 {print $2+0}' "$O/launches.md" | sed -n 6p)
echo "b256 launches: $(awk -F'|' '$4+0 == 256' "$O/launches.md" | wc -l), profiling launch ${IDX:-none}"
awk -F'|' '$4+0 == 256' "$O/launches.md" | head -12
save
if [ -n "${IDX:-}" ]; then
  date -u +%T
  timeout -s KILL 150 "$NCU" --clock-control none -k regex:^decode_attn --launch-skip "$IDX" -c 1 \
    --kill yes --set full --import-source no -o "$O/rep" -f /tmp/gm/tandem-gpu-bench kernels \
    --shape llama3-8b --decode-blocks 2048 > "$O/ncu.log" 2>&1
  echo "ncu rc=$? at $(( $(date +%s) - t0 )) s"
  "$NCU" -i "$O/rep.ncu-rep" --page details > "$O/details.txt" 2>&1
  "$NCU" -i "$O/rep.ncu-rep" --page source --print-source sass --csv > "$O/sass.csv" 2>&1
  grep -E "Duration|Throughput|Grid Size|Block Size|Registers|Achieved Occupancy|Theoretical Occupancy|Waves|Hit Rate|Shared Memory Configuration|Dynamic Shared" \
    "$O/details.txt" | head -40
  python3 scripts/ncu_sass_summary.py "$O/sass.csv" > "$O/sass.md" 2>&1
  head -40 "$O/sass.md"
  xz -9 "$O/sass.csv"; rm -f "$O/rep.ncu-rep"
fi
date -u +%T
save
