#!/usr/bin/env python3
"""Concurrent chats with a generous max_tokens that end on their own (EOS), against
`tandem up`'s HTTP API (127.0.0.1:8000, SmolLM2-135M-Instruct): how many ran at once,
their latencies, and the output tokens per second of the whole run.

    python3 chats.py [CHATS] [MAX_TOKENS]     # default 32 chats, max_tokens 2048

A decode node that reserves prompt + max_tokens of KV blocks at admission runs only as
many of them at once as its cache holds at full length; one that takes blocks as
sequences grow runs them all (and preempts the newest if the cache fills).
"""
import json
import sys
import threading
import time
import urllib.error
import urllib.request

B = "http://127.0.0.1:8000"
METRICS = "http://127.0.0.1:9090/metrics"
TOPICS = ["the sea", "a small robot", "the moon", "an old library", "a lost key", "winter",
          "a friendly dragon", "the first day of school", "a lighthouse", "rain in the city",
          "a garden", "a train journey", "a clock tower", "a brave mouse", "the desert",
          "a birthday cake"]


def chat(i, max_tokens, out):
    body = {"model": "", "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user",
                          "content": f"Write two sentences about {TOPICS[i % len(TOPICS)]}."}]}
    req = urllib.request.Request(B + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            resp = json.loads(r.read())
    except urllib.error.HTTPError as e:
        out[i] = (time.time() - t, 0, f"HTTP {e.code}")
        return
    out[i] = (time.time() - t, resp["usage"]["completion_tokens"],
              resp["choices"][0]["finish_reason"])


def metric(name):
    text = urllib.request.urlopen(METRICS, timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def main():
    chats = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
    out = {}
    peak = [0.0]
    done = threading.Event()

    def watch():  # the decode node's running sequences, sampled
        while not done.is_set():
            try:
                text = urllib.request.urlopen(METRICS, timeout=5).read().decode()
                for line in text.splitlines():
                    if line.startswith("tandem_kv_blocks_used{") and 'role="decode"' in line:
                        peak[0] = max(peak[0], float(line.split()[-1]))
            except OSError:
                pass
            time.sleep(0.2)

    preempted0 = metric("tandem_preemptions_total")
    w = threading.Thread(target=watch)
    w.start()
    t0 = time.time()
    threads = [threading.Thread(target=chat, args=(i, max_tokens, out)) for i in range(chats)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    done.set()
    w.join()
    lat = sorted(v[0] for v in out.values())
    tokens = sum(v[1] for v in out.values())
    reasons = {}
    for v in out.values():
        reasons[v[2]] = reasons.get(v[2], 0) + 1
    print(f"{chats} chats, max_tokens {max_tokens}: wall {wall:.1f} s, {tokens} output tokens "
          f"({tokens / wall:.1f} tok/s), longest answer {max(v[1] for v in out.values())}, "
          f"finish {reasons}; latency median {lat[len(lat) // 2]:.1f} s, max {lat[-1]:.1f} s; "
          f"decode KV blocks in use at most {peak[0]:.0f}; "
          f"preemptions {metric('tandem_preemptions_total') - preempted0:.0f}")


main()
