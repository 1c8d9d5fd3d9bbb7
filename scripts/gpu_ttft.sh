#!/usr/bin/env bash
# Disaggregated against colocated TTFT on one GPU (issue 16), in one call: an
# 8B-shaped synthesized model (bf16), the gpu-1p1d configs with both nodes on
# GPU 0, `tandem bench` with 4096-token prompts and 128 output tokens at 1 and
# 4 req/s. Three set-ups, side by side:
#   disagg      : prefill node with max_batch_tokens 4096 (a lone 4k prompt in one pass)
#   disagg-512  : the same with max_batch_tokens 512 (the chunk size: eight passes,
#                 what a lone prompt took before the planner was work-conserving)
#   colocated   : the decode node prefills every prompt itself
# SKIP512=1 leaves out the second set-up.
# Expects a `--features cuda` build of `tandem` and cluster-configs/gpu-1p1d in $GPU_DIR.
set -u
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
for role in prefill decode router; do
  sed -e "s|^path = .*|path = \"$M\"|" -e 's|^name = .*|name = "llama3-8b-synth"|' \
      -e 's/^device = .*/device = 0/' "$GPU_DIR/gpu-1p1d/$role.toml" > "$role.toml"
done
# Every prompt computed in full: the prefix cache would let repeated probes skip work.
sed -i -e '/^\[prefill\]/a prefix_cache = false' prefill.toml
sed -i -e '/^\[decode\]/a prefix_cache = false' decode.toml
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
bench() { # label rate
  echo "### $1, $2 req/s" >> "$OUT/ttft.md"
  "$T" bench --router http://127.0.0.1:50051 --num-prompts "$N" --input-len 4096 --output-len 128 \
    --request-rate "$2" --seed 1 --no-progress --result-file "$OUT/$1-$2.json" 2>&1 \
    | tee -a "$OUT/ttft.md"
}
start decode decode.toml decode-disagg; D=$PID
start prefill prefill.toml prefill-4096; P=$PID
start router router.toml router
ready || { tail -20 "$OUT"/*.log; exit 1; }
bench disagg 1; bench disagg 4
if [ -z "${SKIP512:-}" ]; then
stop "$P"
sed -e 's/^max_batch_tokens = .*/max_batch_tokens = 512/' prefill.toml > prefill-512.toml
start prefill prefill-512.toml prefill-512; P=$PID
ready || exit 1
bench disagg-512 1; bench disagg-512 4
fi
stop "$D"
sed -e 's/^local_prefill_below = .*/local_prefill_below = 1000000/' decode.toml > decode-colo.toml
start decode decode-colo.toml decode-colocated; D=$PID
ready || exit 1
bench colocated 1; bench colocated 4
grep -h "prefill\b.*ms\|compute" "$OUT"/prefill-*.log | tail -5 >> "$OUT/ttft.md"
kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null
echo done
