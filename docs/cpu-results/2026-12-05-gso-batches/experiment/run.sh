#!/usr/bin/env bash
# quinn experiment: stock vs patched (env-selected) kv_bench, CPU s/GB and GB/s, rounds taking turns.
set -u
STOCK=/work/target-kv/release/kv_bench
EXP=/work/target-kvexp/release/kv_bench
O=${O:-/work/qx/out}; mkdir -p "$O"
for r in $(seq 1 "${ROUNDS:-3}"); do
  for v in ${VARIANTS:-stock base segs batch both}; do
    case $v in
      stock) b=$STOCK; e="";;
      base) b=$EXP; e="QX_SEGS=10 QX_BATCH=0";;
      segs) b=$EXP; e="QX_SEGS=64 QX_BATCH=0";;
      batch) b=$EXP; e="QX_SEGS=10 QX_BATCH=1";;
      both) b=$EXP; e="QX_SEGS=64 QX_BATCH=1";;
      dg) b=$EXP; e="QX_SEGS=10 QX_DGRAMS=128";;
      segsdg) b=$EXP; e="QX_SEGS=64 QX_DGRAMS=128";;
    esac
    env $e $b --tokens 4096 --conns ${CONNS:-1} --tcp-conns 1 --rx-endpoints 0 --max-udp-payload 1472,8952 \
      --ack-threshold 20 --overlap-tokens 0 > "$O/$v-$r.log" 2>&1
    grep -E "^\| [0-9]" "$O/$v-$r.log" | sed "s/^/$v r$r /"
  done
done
