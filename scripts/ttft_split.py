#!/usr/bin/env python3
"""TTFT of a `tandem bench --result-file` run, split by whether a request's
prefill overlapped another request's decode (on one shared GPU the two nodes'
processes then time-slice the device; a request alone shows the pipeline's own
cost). Prints, per file: requests, median TTFT and median prefill compute span
for each group.

Usage: scripts/ttft_split.py RESULT.json [RESULT.json ...]
"""
import json
import statistics
import sys


def split(path):
    run = json.load(open(path))["runs"][0]
    reqs = [r for r in run["requests"] if r.get("success")]
    spans = [(r["sent_at_s"], r["sent_at_s"] + r["ttft_s"], r["sent_at_s"] + r["e2e_s"]) for r in reqs]
    groups = {"alone": [], "overlapping": []}
    for i, (sent, first, _) in enumerate(spans):
        busy = any(j != i and spans[j][1] < first and spans[j][2] > sent for j in range(len(spans)))
        compute = dict(reqs[i].get("spans_s", [])).get("prefill_compute", 0.0)
        groups["overlapping" if busy else "alone"].append((reqs[i]["ttft_s"] * 1e3, compute * 1e3))
    return groups


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("| run | requests alone | TTFT median ms | compute median ms | requests overlapping a decode | TTFT median ms | compute median ms |")
    print("|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        g = split(path)
        cells = []
        for k in ("alone", "overlapping"):
            xs = g[k]
            med = lambda i: f"{statistics.median(x[i] for x in xs):.1f}" if xs else "–"
            cells += [str(len(xs)), med(0), med(1)]
        print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
