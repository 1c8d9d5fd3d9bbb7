#!/usr/bin/env bash
# Disaggregated against colocated TTFT on one GPU (issue 16), in one call: an
# 8B-shaped synthesized model (bf16), the gpu-1p1d configs with both nodes on
# GPU 0, `tandem bench` with 4096-token prompts and 128 output tokens at 1 and
# 4 req/s. Three set-ups, side by side:
#   disagg      : prefill node with max_batch_tokens 4096 (a lone 4k prompt in one pass)
#   disagg-512  : the same with max_batch_tokens 512 (the chunk size: eight passes,
#                 what a lone prompt took before the planner was work-conserving)
#   colocated   : the decode node prefills every prompt itself
# RATES (default "1 4") are the request rates of the 4k runs. KVCONN=N adds the
# disaggregated set-up again with N QUIC connections per transfer (4 in the configs).
# NOCOLO=1 leaves out the colocated set-up. SKIP512=1 leaves out the second set-up. SAT=1 adds, for the first and the
# last set-up, the saturation run: 768 requests of 512 prompt tokens and 256
# output tokens, 256 at a time. PROBE=1 sends, on the disaggregated cluster, a
# completion with logprobs and a JSON-mode chat (the decode node masks and
# computes log probabilities on the GPU) and records the answers. KVDTYPE=fp8_e4m3
# gives both nodes an fp8 KV cache (and so fp8 KV on the wire). UP=1 adds, last,
# the disaggregated set-up as one `tandem up` process (router, prefill and decode
# nodes sharing the process's CUDA context, so the GPU runs their kernels side by
# side instead of time-slicing between two processes' contexts). MAXRUN=N sets the
# router's max_running (256 in the configs). DECODE_WAITING=N sets router.decode_waiting
# (a saturated decode node holds max_batch + N requests, the rest wait at the router).
# HOLD=false sets decode.hold_first_token = false (a first token that arrives while the
# decode batch is full goes out on arrival instead of with the second token).
# DECODE_BLOCKS=N sets the decode node's kv_blocks (4096 in the configs: 256k tokens).
# NOPAIR=1 leaves out the two-process disaggregated set-up (and so disagg-512 and KVCONN).
# DECODE_PRIORITY=high|normal|auto sets decode.gpu_priority (the decode node's CUDA streams
# ranked above the prefill node's, or not, or only in steps of 32 sequences or more; counts
# in one process and under MPS).
# UP2_PRIORITY=high|normal adds, after UP's, the one-process set-up again with
# decode.gpu_priority set so (label up2).
# MPS=1 runs every set-up under the CUDA Multi-Process Service (a daemon of the driver's,
# `nvidia-cuda-mps-control`, with its pipe and log directories under $WORK, stopped at
# the end), so two processes' kernels share the GPU side by side instead of taking turns.
# Expects a `--features cuda` build of `tandem` and cluster-configs/gpu-1p1d in $GPU_DIR.
set -u
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
GPU_DIR=$(cd "${GPU_DIR:-.gpu}" && pwd)
OUT=${OUT:-/tmp/tandem-ttft-out}
N=${N:-48}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
T=$GPU_DIR/tandem
WORK=${WORK:-/tmp/tandem-ttft}
mkdir -p "$WORK" && cd "$WORK"
M=$WORK/llama3-8b-synth
if [ ! -f "$M/config.json" ]; then
  s=$(date +%s)
  "$T" model synth --out "$M" --vocab 128256 --hidden 4096 --intermediate 14336 --layers 32 \
    --heads 32 --kv-heads 8 --max-position 8192 --bf16 --shards 4 > /dev/null || exit 1
  echo "synthesized the 8B shape in $(( $(date +%s) - s )) s" | tee -a "$OUT/ttft.md"
fi
# Sets KEY = VALUE in SECTION of FILE, in place of any line that set it.
set_key() { # FILE SECTION KEY VALUE
  sed -i -e "/^$3 *=/d" -e "/^\[$2\]/a $3 = $4" "$1"
}
for role in prefill decode router; do
  sed -e "s|^path = .*|path = \"$M\"|" -e 's|^name = .*|name = "llama3-8b-synth"|' \
      -e 's/^device = .*/device = 0/' "$GPU_DIR/gpu-1p1d/$role.toml" > "$role.toml"
done
if [ -n "${MAXRUN:-}" ]; then
  sed -i -e "s/^max_running = .*/max_running = $MAXRUN/" router.toml
fi
if [ -n "${DECODE_WAITING:-}" ]; then
  set_key router.toml router decode_waiting "$DECODE_WAITING"
fi
if [ -n "${DECODE_BLOCKS:-}" ]; then
  sed -i -e "s/^kv_blocks = [0-9]*/kv_blocks = $DECODE_BLOCKS/" decode.toml
fi
if [ -n "${DECODE_PRIORITY:-}" ]; then
  set_key decode.toml decode gpu_priority "\"$DECODE_PRIORITY\""
fi
if [ -n "${HOLD:-}" ]; then
  set_key decode.toml decode hold_first_token "$HOLD"
fi
# Every prompt computed in full: the prefix cache would let repeated probes skip work.
set_key prefill.toml prefill prefix_cache false
set_key decode.toml decode prefix_cache false
if [ -n "${KVDTYPE:-}" ]; then
  set_key prefill.toml prefill kv_dtype "\"$KVDTYPE\""
  set_key decode.toml decode kv_dtype "\"$KVDTYPE\""
fi
if [ -n "${MPS:-}" ]; then
  export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps-pipe CUDA_MPS_LOG_DIRECTORY=$WORK/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    echo "MPS daemon started" | tee -a "$OUT/ttft.md"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    echo "MPS: nvidia-cuda-mps-control did not start; running without it" | tee -a "$OUT/ttft.md"
  fi
fi
PIDS=()
start() { # role config log: starts a node; its pid in $PID
  "$T" "$1" --config "$2" > "$OUT/$3.log" 2>&1 & PID=$!; PIDS+=("$PID"); }
stop() { # pid: stops a node and waits until it is gone (its ports free)
  kill "$1" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$1" 2>/dev/null; sleep 1; }
ready() { # wait for the router to answer a 4k prompt end to end
  for _ in $(seq 1 240); do
    if "$T" bench --router http://127.0.0.1:50051 --num-prompts 1 --input-len 4096 --output-len 4 \
         --no-progress > /dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "cluster not ready"; return 1
}
ready_remote() { # [log]: after a prefill node (re)start: ready, and the probe was prefilled there
  # (until the router uses the new node again it forces local prefills, which
  # would make a disaggregated run a colocated one)
  for _ in $(seq 1 60); do
    ready || return 1
    grep -h admitted "$OUT/${1:-decode-disagg}.log" | tail -1 | grep -q 'reason="remote"' && return 0
    sleep 1
  done
  echo "the router does not use the restarted prefill node"; return 1
}
bench() { # label rate
  echo "### $1, $2 req/s" >> "$OUT/ttft.md"
  "$T" bench --router http://127.0.0.1:50051 --num-prompts "$N" --input-len 4096 --output-len 128 \
    --request-rate "$2" --seed 1 --no-progress --result-file "$OUT/$1-$2.json" 2>&1 \
    | tee -a "$OUT/ttft.md"
}
sat() { # label: the saturation run
  [ -n "${SAT:-}" ] || return 0
  echo "### $1, saturation (768 x 512/256, 256 concurrent)" >> "$OUT/ttft.md"
  "$T" bench --router http://127.0.0.1:50051 --num-prompts 768 --input-len 512 --output-len 256 \
    --request-rate inf --max-concurrency 256 --seed 1 --no-progress --result-file "$OUT/$1-sat.json" 2>&1 \
    | tee -a "$OUT/ttft.md"
}
probe() { # a logprobs completion and a JSON-mode chat, answers into ttft.md
  [ -n "${PROBE:-}" ] || return 0
  python3 - >> "$OUT/ttft.md" 2>&1 <<'PY'
import json, urllib.request
def post(path, body):
    req = urllib.request.Request("http://127.0.0.1:8000" + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=120))
c = post("/v1/completions", {"model": "llama3-8b-synth", "prompt": "The cluster", "max_tokens": 6,
                             "logprobs": 3, "seed": 1, "temperature": 0.8})
lp = c["choices"][0]["logprobs"]
print("### probe: completion with logprobs 3\n\ntokens", lp["tokens"], "\nlogprobs", lp["token_logprobs"],
      "\ntop", lp["top_logprobs"][:2], "\n")
ok = 0
for seed in range(5):
    r = post("/v1/chat/completions", {"model": "llama3-8b-synth", "max_tokens": 64, "seed": seed,
             "messages": [{"role": "user", "content": "a json object"}],
             "response_format": {"type": "json_object"}})
    text = r["choices"][0]["message"]["content"]
    try:
        json.loads(text); ok += 1
    except ValueError:
        print("not JSON (finish %s): %r" % (r["choices"][0]["finish_reason"], text[:200]))
print("### probe: JSON mode, %d of 5 answers parse\n" % ok)
PY
}
if [ -z "${NOPAIR:-}" ]; then
start decode decode.toml decode-disagg; D=$PID
start prefill prefill.toml prefill-4096; P=$PID
start router router.toml router
# Until the router has seen the prefill node it forces local prefills: wait for a remote one.
ready_remote || { tail -20 "$OUT"/*.log; exit 1; }
probe; for r in ${RATES-1 4}; do bench disagg "$r"; done; sat disagg
else
start router router.toml router
fi
if [ -z "${SKIP512:-}${NOPAIR:-}" ]; then
stop "$P"
sed -e 's/^max_batch_tokens = .*/max_batch_tokens = 512/' prefill.toml > prefill-512.toml
start prefill prefill-512.toml prefill-512; P=$PID
ready_remote || exit 1
bench disagg-512 1; bench disagg-512 4
fi
if [ -n "${KVCONN:-}" ] && [ -z "${NOPAIR:-}" ]; then
stop "$P"
sed -e "s/^kv_connections = .*/kv_connections = $KVCONN/" prefill.toml > prefill-conn.toml
start prefill prefill-conn.toml "prefill-conn$KVCONN"; P=$PID
ready_remote || exit 1
for r in ${RATES-1 4}; do bench "disagg-conn$KVCONN" "$r"; done
fi
if [ -z "${NOCOLO:-}" ]; then
[ -z "${NOPAIR:-}" ] && stop "$D"
sed -e 's/^local_prefill_below = .*/local_prefill_below = 1000000/' decode.toml > decode-colo.toml
start decode decode-colo.toml decode-colocated; D=$PID
ready || exit 1
for r in ${RATES-1 4}; do bench colocated "$r"; done; sat colocated
fi
if [ -n "${UP:-}" ]; then
kill "${PIDS[@]}" 2>/dev/null; for p in "${PIDS[@]}"; do stop "$p"; done
# One file: [model] and [decode] from decode.toml, [router] without the static
# node lists (`up` fills them in), [prefill], one [metrics].
{ sed -n '/^\[model\]/,/^\[/p' decode.toml | sed '$d'
  sed -n '/^\[router\]/,/^\[metrics\]/p' router.toml | sed -e '$d' -e '/^prefill_nodes\|^decode_nodes/d'
  sed -n '/^\[prefill\]/,/^\[metrics\]/p' prefill.toml | sed '$d'
  sed -n '/^\[decode\]/,$p' decode.toml; } > up.toml
cp up.toml "$OUT/up.toml"
start up up.toml up
ready_remote up || { tail -20 "$OUT/up.log"; exit 1; }
for r in ${RATES-1 4}; do bench up "$r"; done; sat up
if [ -n "${UP2_PRIORITY:-}" ]; then
stop "$PID"
cp up.toml up2.toml && set_key up2.toml decode gpu_priority "\"$UP2_PRIORITY\""
start up up2.toml up2
ready_remote up2 || { tail -20 "$OUT/up2.log"; exit 1; }
for r in ${RATES-1 4}; do bench up2 "$r"; done; sat up2
fi
fi
grep -h "prefill\b.*ms\|compute" "$OUT"/prefill-*.log | tail -5 >> "$OUT/ttft.md"
kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null
{ echo; echo "### TTFT of requests alone vs while another request decodes (scripts/ttft_split.py)"; echo
  (cd "$OUT" && python3 "$SCRIPTS/ttft_split.py" ./*.json); } >> "$OUT/ttft.md" 2>&1
# The device tool brings back only a few files: the node logs and the bench's
# JSON results travel as one archive beside ttft.md.
(cd "$OUT" && tar -czf logs.tgz ./*.log ./*.json 2>/dev/null && rm -f ./*.log ./*.json)
echo done
