#!/usr/bin/env bash
# The DistServe comparison on two GPUs (issue 16), in one call: goodput under
# TTFT <= 2 s and TPOT <= 50 ms for 8k prompts, side by side:
#   disagg    : the gpu-1p1d configs as shipped, prefill node on GPU 0, decode node on GPU 1
#   colocated : two decode nodes, one per GPU, each prefilling its own prompts
#               (local_prefill_below huge, no prefill node), behind one router
# An 8B-shaped synthesized model (bf16), `tandem bench` at each rate of $RATES
# with N requests of IN prompt tokens and OUTLEN output tokens, prefix caches off.
# Expects a `--features cuda` build of `tandem` and cluster-configs/gpu-1p1d in
# $GPU_DIR. Exits 2 with a message on a machine with fewer than two GPUs.
set -u
GPU_DIR=$(cd "${GPU_DIR:-.gpu}" && pwd)
OUT=${OUT:-/tmp/tandem-distserve-out}
N=${N:-48}
RATES=${RATES:-1,2,3,4}
IN=${IN:-8192}
OUTLEN=${OUTLEN:-256}
SLO=${SLO:-ttft=2s,tpot=50ms}
mkdir -p "$OUT"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -lt 2 ]; then
  echo "gpu_distserve.sh needs two GPUs; this machine has $gpus" | tee "$OUT/distserve.md"
  exit 2
fi
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
T=$GPU_DIR/tandem
WORK=${WORK:-/tmp/tandem-distserve}
mkdir -p "$WORK" && cd "$WORK"
M=$WORK/llama3-8b-synth-16k
if [ ! -f "$M/config.json" ]; then
  s=$(date +%s)
  "$T" model synth --out "$M" --vocab 128256 --hidden 4096 --intermediate 14336 --layers 32 \
    --heads 32 --kv-heads 8 --max-position 16384 --bf16 --shards 4 > /dev/null || exit 1
  echo "synthesized the 8B shape in $(( $(date +%s) - s )) s" | tee -a "$OUT/distserve.md"
fi
for role in prefill decode router; do
  sed -e "s|^path = .*|path = \"$M\"|" -e 's|^name = .*|name = "llama3-8b-synth"|' \
      "$GPU_DIR/gpu-1p1d/$role.toml" > "$role.toml"
done
sed -i -e '/^prefix_cache *=/d' -e '/^\[prefill\]/a prefix_cache = false' prefill.toml
sed -i -e '/^prefix_cache *=/d' -e '/^\[decode\]/a prefix_cache = false' decode.toml
# Colocated: decode-0 on GPU 0 and decode-1 on GPU 1, each prefilling every prompt.
sed -e 's/^device = .*/device = 0/' -e 's/^local_prefill_below = .*/local_prefill_below = 1000000/' \
    decode.toml > colo-0.toml
sed -e 's/^device = .*/device = 1/' -e 's/^local_prefill_below = .*/local_prefill_below = 1000000/' \
    -e 's/^id = .*/id = "decode-1"/' -e 's/127.0.0.1:50061/127.0.0.1:50063/' \
    -e 's/127.0.0.1:50062/127.0.0.1:50064/' -e 's/127.0.0.1:9092/127.0.0.1:9093/' \
    decode.toml > colo-1.toml
sed -e 's|^prefill_nodes = .*|prefill_nodes = []|' \
    -e 's|^decode_nodes = .*|decode_nodes = ["http://127.0.0.1:50061", "http://127.0.0.1:50063"]|' \
    router.toml > router-colo.toml
PIDS=()
start() { # role config log
  "$T" "$1" --config "$2" > "$OUT/$3.log" 2>&1 & PIDS+=("$!"); }
stop_all() {
  kill "${PIDS[@]}" 2>/dev/null
  for _ in $(seq 1 100); do
    alive=0; for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.1
  done
  kill -9 "${PIDS[@]}" 2>/dev/null; PIDS=(); sleep 1; }
ready() { # the router answers an IN-token prompt end to end
  for _ in $(seq 1 240); do
    if "$T" bench --router http://127.0.0.1:50051 --num-prompts 1 --input-len "$IN" --output-len 4 \
         --no-progress > /dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "cluster not ready"; tail -5 "$OUT"/*.log; return 1
}
bench() { # label
  echo "### $1: $N x ($IN in, $OUTLEN out) at $RATES req/s, SLO $SLO" >> "$OUT/distserve.md"
  "$T" bench --router http://127.0.0.1:50051 --num-prompts "$N" --input-len "$IN" \
    --output-len "$OUTLEN" --request-rate "$RATES" --seed 1 --slo "$SLO" --no-progress \
    --result-file "$OUT/$1.json" 2>&1 | tee -a "$OUT/distserve.md"
}
start decode decode.toml decode-disagg
start prefill prefill.toml prefill
start router router.toml router-disagg
ready && bench disagg
stop_all
start decode colo-0.toml decode-colo-0
start decode colo-1.toml decode-colo-1
start router router-colo.toml router-colo
ready && bench colocated
stop_all
echo done
