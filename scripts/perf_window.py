#!/usr/bin/env python3
"""Flat profile of kv_bench's QUIC runs from `perf script -F time,comm,ip,sym,dso`.

Keeps the samples between the first and the last one in the AES-GCM sealing code
(the QUIC runs; kv_bench runs its TCP baseline before them and allocates the KV
before that), then prints the share of each group (kernel, crypto, copies, quinn,
tokio, other) and the top symbols.

Usage: perf script -i perf.data -F time,comm,ip,sym,dso | scripts/perf_window.py [TOP]
"""
import collections
import re
import sys

LINE = re.compile(r"\s*(\S+)\s+([\d.]+):\s+[0-9a-f]+\s+(.*)\s+\((.*)\)\s*$")


def group(sym, dso):
    if "kernel" in dso or sym.startswith("[k]"):
        return "kernel"
    if "aes" in sym or "gcm" in sym or "ghash" in sym or "aead" in sym:
        return "crypto"
    if "memmove" in sym or "memcpy" in sym:
        return "user copies"
    if "quinn" in sym:
        return "quinn"
    if "tokio" in sym:
        return "tokio"
    if "malloc" in sym or "free" in sym or "realloc" in sym:
        return "allocator"
    return "other"


def main():
    top = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    rows = []
    for line in sys.stdin:
        m = LINE.match(line)
        if m:
            comm, t, sym, dso = m.groups()
            rows.append((float(t), comm, sym.split("+0x")[0], dso))
    seal = [t for t, _, s, _ in rows if "aes_gcm_enc" in s or "seal" in s]
    if not seal:
        sys.exit("no AES-GCM sealing samples: no QUIC run in this profile")
    lo, hi = min(seal), max(seal)
    window = [r for r in rows if lo <= r[0] <= hi]
    n = len(window)
    print(f"{n} samples of {len(rows)} in the QUIC window ({hi - lo:.1f} s)\n")
    print("| group | share |\n|---|---|")
    groups = collections.Counter(group(s, d) for _, _, s, d in window)
    for g, c in groups.most_common():
        print(f"| {g} | {100 * c / n:.1f}% |")
    print("\n| symbol | dso | share |\n|---|---|---|")
    syms = collections.Counter((s[:90], d.split("/")[-1]) for _, _, s, d in window)
    for (s, d), c in syms.most_common(top):
        print(f"| `{s}` | {d} | {100 * c / n:.1f}% |")


if __name__ == "__main__":
    main()
