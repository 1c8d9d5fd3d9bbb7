#!/usr/bin/env bash
# Device call (issue 16, saturation): decode.hold_first_token on the H200. The
# 768 x 512/256 saturation run (256 concurrent) of the disaggregated set-up with
# router.decode_waiting = 8, the decode node holding a first token that arrives
# while its batch is full until the step that computes the second (the default),
# then the same sending it on arrival (HOLD=false, as Round 6 ran), then with
# decode_waiting = 32 (hold on), then without
# decode_waiting: the disaggregated set-up (hold on) and the colocated one.
# DEADLINE_S (590): runs that might not end within it are skipped.
# RUNS picks runs (default all: hold early hold32 unbounded).
# Carry .gpu9 (tandem of this checkout: scripts/gpu-pending/prepare.sh, WHICH=9);
# its kernels are this checkout's, so the binary must be built from it too.
set -u
RUNS=" ${RUNS:-hold early hold32 unbounded} "
O=${OUT:-/tmp/out}/h; mkdir -p "$O"
export TANDEM_CUDA_KERNELS=$PWD/.gpu9/c/kernels
t0=$(date +%s); el() { echo "$1 rc=$2 at $(( $(date +%s) - t0 )) s"; }
G=/tmp/gpu9/c; mkdir -p "$G" && cp -r .gpu9/c/gpu-1p1d "$G/"
[ -x "$G/tandem" ] || { python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
  .gpu9/c/tandem.xz "$G/tandem" && chmod +x "$G/tandem"; }
run() { # name limit env...: one gpu_ttft.sh run of saturation only
  local name=$1 limit=$2; shift 2
  [[ $RUNS == *" $name "* ]] || return 0
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-590}" ] || { echo "$name: skipped (time)"; return; }
  env "$@" OUT=$O/$name GPU_DIR=$G SAT=1 SKIP512=1 RATES= N=8 \
    timeout -s KILL "$limit" bash scripts/gpu_ttft.sh > "$O/$name.out" 2>&1; el "$name" $?
  pkill -9 -f "$G/tandem"; sleep 1
  cp "$O/$name/ttft.md" "$O/ttft-$name.md" 2>/dev/null
}
run hold 200 NOCOLO=1 DECODE_WAITING=8
run early 130 NOCOLO=1 DECODE_WAITING=8 HOLD=false
# More requests prefilled ahead of their place: with the hold their first token
# still waits for it, so the prefill and transfer are off the TTFT's path.
run hold32 130 NOCOLO=1 DECODE_WAITING=32
# Without the bound: the disaggregated set-up (hold on), then the colocated one.
run unbounded 230
for f in "$O"/ttft-*.md; do echo "== $f"; grep -E "Output token throughput|Median TTFT|P99 TTFT|Median TPOT|P99 ITL|Median E2EL" "$f"; done
tar -czf "$O/logs.tgz" -C "$O" $(cd "$O" && ls -d hold early hold32 unbounded 2>/dev/null) && rm -rf "$O"/hold "$O"/early "$O"/hold32 "$O"/unbounded
ls -la "$O"
