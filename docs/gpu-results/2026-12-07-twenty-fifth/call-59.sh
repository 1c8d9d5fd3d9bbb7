#!/usr/bin/env bash
# Device call 59 (twenty-fifth session; carry .gpu58): are a preempted sequence's tokens
# the ones it would have drawn without preemption, on the GPU? The 8B shape (random bf16
# weights), the gpu-1p1d configs with both nodes on GPU 0, f72def5's tandem (new/). 32
# greedy completions of 512 random prompt tokens and 256 output tokens (ignore_eos), all at
# once, first with the configs' decode cache (4096 blocks of 64 tokens: no preemption),
# then with 96 blocks (8 such requests at full length: most are preempted and prefilled
# again on the decode node, whose prefill kernels then compute the KV that decode steps
# computed the first time). Prints, per request, whether the two texts are equal and where
# they first differ. DEADLINE_S (560).
set -u
DEADLINE_S=${DEADLINE_S:-560}
source "$(dirname "$0")/../2026-12-05-eighth/common.sh" c59
G=/tmp/g58/new; mkdir -p "$G" && cp -r .gpu58/gpu-1p1d "$G/"
unxz_to "$G" .gpu58/new/tandem.xz
T=$G/tandem
env_line
W=/tmp/c59; mkdir -p "$W" && cd "$W"
M=$W/llama3-8b-synth
"$T" model synth --out "$M" --vocab 128256 --hidden 4096 --intermediate 14336 --layers 32 \
  --heads 32 --kv-heads 8 --max-position 8192 --bf16 --shards 4 > /dev/null || exit 1
for role in prefill decode router; do
  sed -e "s|^path = .*|path = \"$M\"|" -e 's|^name = .*|name = "synth"|' \
      -e 's/^device = .*/device = 0/' "$G/gpu-1p1d/$role.toml" > "$role.toml"
done
sed -i -e '/^\[decode\]/a prefix_cache = false' decode.toml
sed -i -e '/^\[prefill\]/a prefix_cache = false' prefill.toml
sed -e "s/^kv_blocks = [0-9]*/kv_blocks = 96/" decode.toml > decode-96.toml
cat > ask.py <<'PY'
import json, random, sys, threading, urllib.error, urllib.request
random.seed(7)
prompts = [[random.randrange(10, 890) for _ in range(512)] for _ in range(32)]  # the synth tokenizer has 898 tokens
out = {}
def ask(i):
    body = {"model": "synth", "prompt": prompts[i], "max_tokens": int(sys.argv[2]), "temperature": 0,
            "ignore_eos": True}
    req = urllib.request.Request("http://127.0.0.1:8000/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        r = json.load(urllib.request.urlopen(req, timeout=300))
        out[i] = r["choices"][0]["text"]
    except urllib.error.HTTPError as e:
        out[i] = "ERROR %d %s" % (e.code, e.read()[:200])
    except Exception as e:
        out[i] = "ERROR " + str(e)[:80]
ts = [threading.Thread(target=ask, args=(i,)) for i in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
json.dump([out[i] for i in range(32)], open(sys.argv[1], "w"))
PY
ready() {
  for _ in $(seq 1 180); do
    curl -sf -o /dev/null http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
      -d '{"model":"synth","prompt":[5,6,7],"max_tokens":1}' && return 0; sleep 1
  done; return 1; }
run() { # decode config, label
  "$T" decode --config "$1" > "$O/decode-$2.log" 2>&1 & D=$!
  "$T" prefill --config prefill.toml > "$O/prefill-$2.log" 2>&1 & P=$!
  "$T" router --config router.toml > "$O/router-$2.log" 2>&1 & R=$!
  ready || echo "$2: not ready"
  sleep 3  # the router learns the prefill node (until then it prefills on the decode node)
  s=$(date +%s); timeout -s KILL 200 python3 ask.py "$O/texts-$2.json" "${OUTLEN:-256}"
  echo "$2: 32 requests in $(( $(date +%s) - s )) s; preempted $(grep -c 'preempted:' "$O/decode-$2.log")"
  kill $R $P $D; wait 2>/dev/null; sleep 1
}
run decode.toml big
run decode-96.toml small
python3 - "$O/texts-big.json" "$O/texts-small.json" <<'PY' | tee "$O/compare.txt"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
same = sum(x == y for x, y in zip(a, b))
print(f"identical texts: {same} of {len(a)}")
for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
        k = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        print(f"request {i}: differ from character {k} of {len(x)} / {len(y)}"
              + (f" ({x[:60]!r})" if x.startswith("ERROR") or y.startswith("ERROR") else ""))
PY
grep -hiE "panic| ERROR " "$O"/*.log | head -5
tar -C "$OUT" -czf "$OUT/c59.tgz" c59
