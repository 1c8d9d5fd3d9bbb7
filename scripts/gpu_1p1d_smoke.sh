#!/usr/bin/env bash
# The three roles as separate processes with the CUDA backend, from the configs in
# cluster-configs/gpu-1p1d: prefill on GPU 0, decode on GPU 1 (GPU 0 too on a
# one-GPU machine), router in front; the synthesized quick-start model. A long
# prompt is prefilled by the prefill process and its bf16 KV crosses QUIC to the
# decode process; then a short `tandem bench` run through the router.
# Expects a `--features cuda` build of `tandem` and the gpu-1p1d configs in $GPU_DIR.
set -u
GPU_DIR=$(cd "${GPU_DIR:-.gpu}" && pwd)
OUT=${OUT:-/tmp/tandem-1p1d-out}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
T=$GPU_DIR/tandem
GPUS=$(nvidia-smi -L | wc -l)
DECODE_GPU=$([ "$GPUS" -ge 2 ] && echo 1 || echo 0)
WORK=$(mktemp -d)
cd "$WORK"
"$T" model synth --out models/tandem-synth > /dev/null
for role in prefill decode router; do
  sed -e 's|^path = .*|path = "models/tandem-synth"|' -e 's|^name = .*|name = "tandem-synth"|' \
      "$GPU_DIR/gpu-1p1d/$role.toml" > "$role.toml"
done
sed -i "s/^device = .*/device = $DECODE_GPU/" decode.toml
echo "GPUs: $GPUS; prefill on GPU 0, decode on GPU $DECODE_GPU" | tee "$OUT/1p1d.txt"
"$T" decode --config decode.toml > "$OUT/decode.log" 2>&1 & D=$!
"$T" prefill --config prefill.toml > "$OUT/prefill.log" 2>&1 & P=$!
"$T" router --config router.toml > "$OUT/router.log" 2>&1 & R=$!
LONG="Once upon a time there was a small robot who lived in a quiet town by the sea, and every morning it walked along the shore collecting shells, counting waves and talking to the gulls about the weather"
# Ready when a prompt long enough for the prefill node goes through.
for i in $(seq 1 90); do
  timeout 10 "$T" generate "$LONG" --max-tokens 1 >/dev/null 2>&1 && break
  sleep 1
done
{
  echo "== long prompt (prefill process -> KV over QUIC -> decode process)"
  timeout 60 "$T" generate "$LONG" --max-tokens 24 2>&1
  echo; echo "== the same prompt in one process on the CPU (reference)"
  timeout 120 "$T" generate --local --model models/tandem-synth "$LONG" --max-tokens 24 2>&1
  echo; echo "== tandem bench through the router (256-token prompts, 64 out)"
  timeout 200 "$T" bench --num-prompts 200 --request-rate 40 --input-len 256 --output-len 64 \
      --result-file "$OUT/bench.json" 2>&1 | grep -v "^\s*$" | tail -32
} | tee -a "$OUT/1p1d.txt"
kill $R $P $D; wait 2>/dev/null
grep -iE "error|panic" "$OUT"/*.log | head -5
