#!/usr/bin/env bash
# Device call 57 (twenty-fifth session, carry .gpu55): issue 15's table on the issue's own card.
# On an H200 it runs the twenty-third session's call-55.sh (main's binary and kernels, ~470 s);
# on any other card it says which and stops, so a try that gets an H100 costs only the start.
set -u
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
case "$name" in
  *H200*) exec bash docs/gpu-results/2026-12-07-twenty-third/call-55.sh ;;
  *) echo "not an H200: call 55 not run"; mkdir -p "$OUT" && echo "$name" > "$OUT/card.txt" ;;
esac
