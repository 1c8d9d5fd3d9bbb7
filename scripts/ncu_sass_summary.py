#!/usr/bin/env python3
"""Where a kernel's instructions and stalls go, from Nsight Compute's SASS page.

    ncu -k regex:prefill_attn --launch-skip N -c 1 --set full -o rep BINARY ARGS
    ncu -i rep.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 scripts/ncu_sass_summary.py sass.csv

Groups instructions by how often each executed (warp-level): in a loop kernel
the per-iteration code of each role shows up as one group (e.g. the prefill
attention's consumer warps per K/V tile, its producer warps per tile, a
spin-wait loop), with its opcode mix and share of stall samples; then lists
the instructions with the most stall samples.
"""
import csv
import sys
from collections import Counter, defaultdict

rows = list(csv.reader(open(sys.argv[1])))
hdr = rows[1]
i_src = hdr.index("Source")
i_exec = hdr.index("Instructions Executed")
i_stall = hdr.index("Warp Stall Sampling (All Samples)")
data = []
for r in rows[2:]:
    try:
        data.append((r[i_src].strip(), int(r[i_exec]), int(r[i_stall])))
    except (ValueError, IndexError):
        continue


def opcode(s):
    w = s.split()
    op = w[1] if w[0].startswith("@") else w[0]
    return op.split(".")[0]


total = sum(n for _, n, _ in data)
stalls = sum(w for _, _, w in data) or 1
groups = defaultdict(lambda: [0, 0, 0, Counter()])
for s, n, w in data:
    g = groups[round(n, -5)]
    g[0] += 1
    g[1] += n
    g[2] += w
    g[3][opcode(s)] += 1
print(f"warp instructions executed: {total / 1e6:.1f}M; stall samples: {stalls}\n")
print("| executions per instruction | static instructions | executed | stall samples | opcodes (static count) |")
print("|---|---|---|---|---|")
for key, (k, n, w, ops) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]:
    mix = ", ".join(f"{o} {c}" for o, c in ops.most_common(8))
    print(f"| ~{key / 1e6:.1f}M | {k} | {100 * n / total:.1f}% | {100 * w / stalls:.1f}% | {mix} |")
print("\n| stall samples | executions | instruction |\n|---|---|---|")
for s, n, w in sorted(data, key=lambda d: -d[2])[:12]:
    print(f"| {100 * w / stalls:.1f}% | {n} | `{s[:80]}` |")
