# Sourced by this folder's device calls (bash, `set -u`): the GPU machine's CUDA
# libraries, the call's output folder $O ($OUT/$1), and
#   unxz_to DIR FILE.xz..  each binary unpacked into DIR, executable
#   env_line               the card, its memory, driver and clock, into $O/env.txt and out
#   smi_start, smi_stop    log the card's clocks, power and temperature every 100 ms
#                          ($O/smi.csv) and its power limit and throttle reasons every
#                          250 ms ($O/smi-reasons.csv) between the two; smi_stop prints
#                          how often each clock and each reason was seen
#   step NAME LIMIT KERNELS COMMAND..
#                          COMMAND with TANDEM_CUDA_KERNELS=KERNELS (empty: the binary's
#                          own) under a LIMIT-second kill, output in $O/NAME.md; skipped
#                          when it might run past DEADLINE_S (580) from sourcing.
O=${OUT:-/tmp/out}/$1; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:$NV/nccl/lib:${LD_LIBRARY_PATH:-}
t0=$(date +%s)
unxz_to() {
  local dir=$1; shift; mkdir -p "$dir"
  for f in "$@"; do
    local b; b=$(basename "$f" .xz)
    python3 -c "import lzma,sys; open(sys.argv[2],'wb').write(lzma.open(sys.argv[1]).read())" \
      "$f" "$dir/$b" && chmod +x "$dir/$b"
  done
}
env_line() {
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; } > "$O/env.txt"
  cat "$O/env.txt"
}
step() {
  local name=$1 limit=$2 k=$3; shift 3
  [ $(( $(date +%s) - t0 + limit )) -lt "${DEADLINE_S:-580}" ] || { echo "$name: skipped (time)"; return; }
  if [ -n "$k" ]; then
    TANDEM_CUDA_KERNELS=$k timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  else
    timeout -s KILL "$limit" "$@" > "$O/$name.md" 2>&1
  fi
  echo "$name rc=$? at $(( $(date +%s) - t0 )) s"
}
smi_start() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv -lms 100 > "$O/smi.csv" 2>&1 &
  SMI1=$!
  nvidia-smi --query-gpu=timestamp,power.limit,clocks_throttle_reasons.active --format=csv -lms 250 > "$O/smi-reasons.csv" 2>&1 &
  SMI2=$!
}
# Stops the logs and prints how often each clock and each throttle reason was seen.
smi_stop() {
  kill "$SMI1" "$SMI2" 2>/dev/null
  awk -F', ' 'NR>1 {print $2}' "$O/smi.csv" | sort | uniq -c | sort -rn | head -8
  awk -F', ' 'NR>1 {print $3}' "$O/smi-reasons.csv" | sort | uniq -c | sort -rn | head -6
}
