#!/usr/bin/env bash
# Device call 69 (twenty-ninth session; carry .gpu55 and .gpu68): whatever card comes is used.
# On an H200, issue 15's table (the twenty-third session's call-55.sh, ~470 s); on any other
# card, issue 16's gpu_priority comparison (the twenty-eighth session's call-68.sh, ~520 s).
set -u
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
here=$(dirname "$0")
case "$name" in
  *H200*) exec bash "$here/../2026-12-07-twenty-third/call-55.sh" ;;
  *) exec bash "$here/../2026-12-07-twenty-eighth/call-68.sh" ;;
esac
