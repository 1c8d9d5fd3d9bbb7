#!/usr/bin/env bash
# `tandem up` on one GPU (both roles on it) with the CUDA backend, then the same
# prompts on the CPU backend: a long prompt goes through the prefill node and its
# bf16 KV crosses QUIC to the decode node; a short one is prefilled on the decode
# node. Expects a `--features cuda` build of `tandem` in $GPU_DIR (default .gpu).
set -u
GPU_DIR=$(cd "${GPU_DIR:-.gpu}" && pwd)
OUT=${OUT:-/tmp/tandem-up-out}
mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
T=$GPU_DIR/tandem
WORK=$(mktemp -d)
cd "$WORK"
LONG="Once upon a time there was a small robot who lived in a quiet town by the sea, and every morning it walked along the shore collecting shells, counting waves and talking to the gulls about the weather"
for backend in cuda cpu; do
  sed -e "s/^backend = .*/backend = \"$backend\"/" "$GPU_DIR/local-cuda.toml" > "$backend.toml"
  "$T" up --config "$backend.toml" > "$OUT/up-$backend.log" 2>&1 &
  pid=$!
  for i in $(seq 1 60); do
    timeout 10 "$T" generate "hi" --max-tokens 1 >/dev/null 2>&1 && break
    sleep 1
  done
  echo "== $backend: long prompt (remote prefill, KV over QUIC)"
  timeout 60 "$T" generate "$LONG" --max-tokens 24 2>&1 | tee "$OUT/long-$backend.txt"
  echo; echo "== $backend: short prompt (prefilled on the decode node)"
  timeout 60 "$T" generate "The sea was" --max-tokens 24 2>&1 | tee "$OUT/short-$backend.txt"
  echo
  kill "$pid"; wait "$pid" 2>/dev/null
  grep -iE "error|panic|warn" "$OUT/up-$backend.log" | head -5
done
