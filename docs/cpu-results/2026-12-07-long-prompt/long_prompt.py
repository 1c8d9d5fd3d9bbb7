#!/usr/bin/env python3
"""One 6000-token prompt beside a short request every 2 s, against `tandem up`'s
HTTP API (127.0.0.1:8000): the statuses and latencies of the short ones.

    python3 long_prompt.py remote   # the long prompt goes to the prefill node
    python3 long_prompt.py local    # echo + logprobs (lm-eval's scoring): the
                                    # decode node prefills it itself
"""
import json
import random
import sys
import threading
import time
import urllib.error
import urllib.request

B = "http://127.0.0.1:8000"


def post(body, timeout=300):
    req = urllib.request.Request(B + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    t = time.time()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, time.time() - t
    except urllib.error.HTTPError as e:
        return e.code, time.time() - t
    except Exception as e:  # a timeout, a reset
        return str(e)[:40], time.time() - t


mode = sys.argv[1] if len(sys.argv) > 1 else "remote"
random.seed(1 if mode == "local" else 2)
body = {"prompt": [random.randrange(100, 40000) for _ in range(6000)], "max_tokens": 1}
if mode == "local":
    body.update(echo=True, logprobs=1)
res = {}
t0 = time.time()
th = threading.Thread(target=lambda: res.update(long=post(body)))
th.start()
shorts = []
while th.is_alive() and time.time() - t0 < 280:
    st, dt = post({"prompt": "Hi", "max_tokens": 2})
    shorts.append((round(time.time() - t0, 1), st, round(dt, 2)))
    time.sleep(2)
th.join()
codes = {}
for _, st, _ in shorts:
    codes[st] = codes.get(st, 0) + 1
print(f"{mode}: long prompt {res['long'][0]} in {res['long'][1]:.1f} s; "
      f"{len(shorts)} short requests: statuses {codes}, max latency {max(d for _, _, d in shorts):.2f} s")
