#!/usr/bin/env bash
# Device call 62 (twenty-seventh session; carry .gpu55 and .gpu61): whatever card comes is used.
# On an H200, issue 15's table (the twenty-third session's call-55.sh, ~470 s); on any other
# card, issue 16's benchmark with main (call-61.sh, ~300 s).
set -u
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $name"
here=$(dirname "$0")
case "$name" in
  *H200*) exec bash "$here/../2026-12-07-twenty-third/call-55.sh" ;;
  *) exec bash "$here/call-61.sh" ;;
esac
