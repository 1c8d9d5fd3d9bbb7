#!/usr/bin/env python3
"""Where a kernel's instructions and stalls go, from Nsight Compute's SASS page.

    ncu -k regex:prefill_attn --launch-skip N -c 1 --set full -o rep BINARY ARGS
    ncu -i rep.ncu-rep --page source --print-source sass --csv > sass.csv
    python3 scripts/ncu_sass_summary.py sass.csv

Groups instructions by how often each executed (warp-level): in a loop kernel
the per-iteration code of each role shows up as one group (e.g. the prefill
attention's consumer warps per K/V tile, its producer warps per tile, a
spin-wait loop), with its opcode mix and share of stall samples; then the
stall reasons' shares (where the report has per-reason columns) and the
instructions with the most stall samples, with their main reasons.
"""
import csv
import sys
from collections import Counter, defaultdict

rows = list(csv.reader(open(sys.argv[1])))
hdr = rows[1]
i_src = hdr.index("Source")
i_exec = hdr.index("Instructions Executed")
i_stall = hdr.index("Warp Stall Sampling (All Samples)")
# Per-reason sample columns (`stall_wait`, `stall_barrier`, ...), where the
# report has them (Nsight Compute 2025 does).
reasons = [(n[len("stall_"):], i) for i, n in enumerate(hdr)
           if n.startswith("stall_") and "Not Issued" not in n]
data = []
for r in rows[2:]:
    try:
        why = {n: int(r[i]) for n, i in reasons if r[i].isdigit()}
        data.append((r[i_src].strip(), int(r[i_exec]), int(r[i_stall]), why))
    except (ValueError, IndexError):
        continue


def opcode(s):
    w = s.split()
    op = w[1] if w[0].startswith("@") else w[0]
    return op.split(".")[0]


total = sum(n for _, n, _, _ in data)
stalls = sum(w for _, _, w, _ in data) or 1
groups = defaultdict(lambda: [0, 0, 0, Counter()])
for s, n, w, _ in data:
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
if reasons:
    by_reason = Counter()
    for *_, why in data:
        by_reason.update(why)
    print("\n| stall reason | share of samples |\n|---|---|")
    for name, v in by_reason.most_common(10):
        print(f"| {name} | {100 * v / stalls:.1f}% |")


def top_reasons(why):
    return ", ".join(f"{k} {v}" for k, v in Counter(why).most_common(2) if v)


print("\n| stall samples | executions | instruction | main reasons |\n|---|---|---|---|")
for s, n, w, why in sorted(data, key=lambda d: -d[2])[:12]:
    print(f"| {100 * w / stalls:.1f}% | {n} | `{s[:80]}` | {top_reasons(why)} |")
