#!/usr/bin/env bash
# Builds the git-ignored folders the pending device calls carry (README.md's
# table), from the revisions they name, so a session that finds them gone (a
# new checkout keeps no ignored files) rebuilds them with one command before
# its first device call:
#   .gpu8   call-a (old/), call-3: old/ (28df44d's tandem-gpu-bench and kernels,
#           before the large-batch decode kernels) and patched/ (this checkout's
#           tandem-gpu-bench, engine-tests and kernels)
#   .gpu9   call-c, call-h: c/tandem.xz (binary c, this checkout), c/gpu-1p1d and
#           c/kernels (the kernels it was built with)
#   .gpu10  call-kv: kv_bench_old (ff5b012), kv_bench_zc (8b4e76d: stock quinn)
#           and kv_bench_new (this checkout)
#   .gpu12  call-t: this checkout's tandem-gpu-bench (TMA prefill attention) and
#           scripts/hf_reference.py
#   .gpu13  call-a, call-b, call-v: this checkout's tandem-gpu-bench and
#           engine-tests (xz), their kernels, scripts/hf_reference.py
#   .gpu14  tenth session's call-1, call-4: main/ (this checkout's tandem-gpu-bench and
#           kernels; the split/ of call-e came from gemv-split-k.patch, dropped)
#   .gpu15  call-p, tenth session's call-1: this checkout's engine-tests (xz)
#   .gpu17  tenth session's call-6 (dropped after it ran): 53eef88 with gemv-rope-kv.patch (tandem-gpu-bench,
#           engine-tests, kernels; xz); call-6 carries .gpu14 and .gpu18 beside it
#   .gpu18  the same with gemv-add-rmsnorm.patch applied after it
#   .gpu19  eleventh session's call-7 (ran on an H100): 48811f9's tandem-gpu-bench and
#           engine-tests (xz) and kernels (the L2 prefetches at batch 1, with the side
#           stream that main dropped after that call)
#   .gpu20  eleventh session's call-8 (ran in the twelfth; patch dropped): 4a40548 with
#           docs/gpu-results/2026-12-06-eleventh/gemv-add-rmsnorm-v2.patch
#           (tandem-gpu-bench, engine-tests, xz; kernels)
#   .gpu21  cf4f676 (cuBLASLt tuning of decode-sized products only; tandem-gpu-bench,
#           engine-tests, xz; kernels): superseded by .gpu22 before any call ran it
#   .gpu22  twelfth session's call-9 and call-10: ef57e95 (the tuning of full prefill passes
#           too; tandem-gpu-bench, engine-tests, xz; kernels; scripts/hf_reference.py)
#   .gpu23  twelfth session's call-11 (not run yet): main/ (b064a30's tandem-gpu-bench and
#           kernels), silu/ (the same with silu-unrolled.patch, and its engine-tests),
#           resid/ (01b5f31 with residual-epilogue.patch, and its engine-tests), xz;
#           scripts/hf_reference.py
#   .gpu24-26 thirteenth session's calls 13-16 (ran; built by hand from 76b8069, its
#           residual-epilogue and the 128-key tile patches; see that folder's scripts)
#   .gpu27  thirteenth session's calls 17-20 (ran in the fourteenth): main/ (7f94132's tandem-gpu-bench and
#           kernels), bk128/ (the same with prefill-bk128-lanes.patch), lanes64/ (that
#           patch's kernels with 64-key tiles, for main's binary), nofence/ (main's kernels
#           with prefill-tma-nofence.patch), pairs/ (7f94132 with
#           prefill-tma-pairs.patch, and its engine-tests), xz; scripts/hf_reference.py
#   .gpu28  fourteenth session's call-21: main/ (this checkout's tandem-gpu-bench,
#           engine-tests and tandem, xz; kernels; the gpu-1p1d configs);
#           scripts/hf_reference.py
#   .gpu29  fourteenth session's calls 22-24 (ran in the fifteenth): main/ (256e400's
#           tandem-gpu-bench and kernels), tune/ (the same with tune-at-start.patch:
#           tandem-gpu-bench, engine-tests, tandem, kernels, the gpu-1p1d configs), xz;
#           scripts/hf_reference.py
#   .gpu30  fifteenth session's call-25 (ran in the sixteenth, and call-27 on it):
#           32dcca8's tandem-gpu-bench and engine-tests (xz); k/main, k/A
#           (prefill-wait-after-softmax.patch), k/B (and prefill-fence-copies-only.patch),
#           k/U (7e67fc5's, for calls 28-30): kernels; scripts/hf_reference.py
#   .gpu31  fifteenth session's call-26 (ran in the sixteenth): main/ (dc49b29's
#           tandem-gpu-bench and kernels), split/ (the same with
#           gemm-split-k-variants.patch, and its engine-tests), xz
#   .gpu32  sixteenth session's call-31 (not run yet): tiles/ (7e67fc5 with
#           gemm-tile-variants.patch: tandem-gpu-bench, kernels, engine-tests), xz
#   .gpu58  twenty-fifth session's call-58: old/ (6bd5912), new/ (f72def5) and next/ (b21fc0e:
#           waiting in line at the router) tandem (xz),
#           cluster-configs/gpu-1p1d
#   .gpu60  twenty-sixth session's call-60 (ran on an H100's host): kv_bench_main (35bedb3),
#           kv_bench_zc (461b630: quinn's receive buffers) and kv_bench_lanes (461b630 with
#           the twenty-third session's kv-lanes.patch), xz
#   .gpu61  twenty-seventh session's call-61: 2553a5e's tandem (xz), cluster-configs/gpu-1p1d
#   .gpu67  twenty-eighth session's call-67 (ran): 7c2deb7's tandem and engine tests (xz),
#           cluster-configs/gpu-1p1d
#   .gpu68  twenty-eighth session's call-68 (not run yet): ec50ce0's tandem (xz),
#           cluster-configs/gpu-1p1d
#   .gpu70  twenty-ninth session's call-70 (not run yet): kv_bench_ring (c6efb50) and
#           kv_bench_awslc (c6efb50 with docs/cpu-results/2026-12-07-aws-lc/kv-awslc.patch), xz
#   .gpu71  thirtieth session's call-71 (not run yet): e29da65's tandem and engine tests
#           (xz: decode.gpu_priority = "auto"), cluster-configs/gpu-1p1d
#   .gpu72  thirty-first session's call-72 (calls 69 and 71 from one build): 2efd84e's
#           tandem-gpu-bench, tandem and engine tests (xz), kernels, hf_reference.py,
#           cluster-configs/gpu-1p1d
#   .gpu33  sixteenth session's call-33 (not run yet): main/ (7e67fc5's tandem-gpu-bench
#           and kernels), norm/ (the same with norm-rows-in-registers.patch, and its
#           engine-tests), xz
#   .gpu34  eighteenth session's call-34 (ran in the nineteenth): main/ (7f960c0's
#           tandem-gpu-bench and kernels), new/ (the same with norm-many-rows.patch: its
#           tandem-gpu-bench, engine-tests and kernels), xz
#   .gpu35  nineteenth session's call-35 (ran on an H100, and an H200 in the twentieth): this
#           checkout's tandem-gpu-bench (`kernels --decode-blocks`), xz, and kernels
#   .gpu36  nineteenth session's calls 36-37 (ran): new/ (7cefa77, where
#           norm-rows-kernel.patch landed: tandem-gpu-bench, engine-tests, kernels), xz;
#           call-36 carries .gpu34 beside it for main/
#   .gpu39  nineteenth session's call-39 (ran in the twentieth; patch dropped): this
#           checkout's tandem-gpu-bench and engine-tests (xz), main/kernels (its kernels)
#           and new/kernels (the same with decode-attn-table-smem.patch, kernels only)
#   .gpu40  twentieth session's call-40 (ran): 9e0e23c's tandem-gpu-bench with the four-wave
#           A/B table (built by hand from the working tree), xz, and kernels
#   .gpu41  twentieth session's call-41 (not run yet): as .gpu39, with
#           decode-tile-one-block.patch
#   .gpu42  twenty-first session's call-42: 30b2ea6's tandem-gpu-bench and engine-tests
#           (xz), kernels/ (its kernels) and kernels-tile/ (the same with
#           decode-tile-one-block.patch); carried beside .gpu41
#   .gpu46  twenty-first session's call-46 (not run yet): d0eb820's tandem-gpu-bench and
#           engine-tests (xz) and kernels
#   .gpu47  twenty-first session's call-47 (not run yet): d0eb820 with
#           prefill-heads-fastest.patch (tandem-gpu-bench, engine-tests, xz; kernels/,
#           kernels-both/ with rope-kv-wide.patch too, kernels-rope/ main's with
#           rope-kv-wide.patch); carried beside .gpu46
#   .gpu48  twenty-second session's call-48 and call-49: 384755e's tandem-gpu-bench (xz;
#           `bench --prefill-chunk`) and kernels (main's, as .gpu46's)
#   .gpu55  twenty-third session's call-55 (not run yet): a3fc187's tandem-gpu-bench and
#           engine-tests (xz), kernels (rope_kv in 16-byte items) and hf_reference.py
# Every folder carries the kernel sources its binaries were built with: a binary
# given another revision's kernels (TANDEM_CUDA_KERNELS) launches them with the
# wrong parameters (the call-h failure of 2026-12-05: CUDA_ERROR_INVALID_VALUE,
# then a segfault). WHICH="13 14" picks folders. Each revision builds in a worktree of its own
# with a target directory of its own (a shared one would rebuild everything
# between them). CUDA builds on the 2-core VM take 10-20 minutes each.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
WHICH=${WHICH:-"8 9 10 12 13 14 15 17 18 19 20 21 22 23 27 28 29 30 31 32 33"}
T=${TARGETS:-/work}   # where the target directories go: $T/target-prep-NAME

# worktree NAME REV [PATCHES]: a clean worktree of REV at /work/prep-NAME, the
# space-separated PATCHES applied in order.
worktree() {
  local dir=/work/prep-$1
  git worktree remove --force "$dir" 2>/dev/null || rm -rf "$dir"
  git worktree prune
  git worktree add -q --detach "$dir" "$2"
  for p in ${3:-}; do git -C "$dir" apply "$ROOT/$p"; done
  echo "$dir"
}
# build DIR NAME ARGS...: cargo build --release in DIR with its own target directory.
build() {
  local dir=$1 name=$2; shift 2
  (cd "$dir" && CARGO_TARGET_DIR=$T/target-prep-$name cargo build --release --locked "$@")
}
rel() { echo "$T/target-prep-$1/release"; }
# bench_into DIR NAME OUT: DIR's tandem-gpu-bench (target directory NAME), stripped,
# into the folder OUT, with the kernel sources it was built with.
bench_into() {
  build "$1" "$2" --features cuda -p tandem-engine --bin tandem-gpu-bench
  strip -o "$3/tandem-gpu-bench" "$(rel "$2")/tandem-gpu-bench"
  cp -r "$1/engine/src/cuda/kernels" "$3/"
}
# engine_tests DIR NAME: builds the engine's unit-test binary (CUDA tests included) in
# DIR with target directory NAME and prints its path.
engine_tests() {
  (cd "$1" && CARGO_TARGET_DIR=$T/target-prep-$2 cargo test --release --locked -p tandem-engine \
     --features cuda --lib --no-run --message-format=json) \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])' | head -1
}

# A kernels-only patch's folder: this checkout's tandem-gpu-bench and engine tests
# (xz), main/kernels (its kernels) and new/kernels (the same with the patch).
kernels_patch_folder() {
  local g=$1 patch=$2 d
  rm -rf "$g" && mkdir -p "$g/main" "$g/new"
  d=$(worktree hcalls HEAD)
  bench_into "$d" hcalls "$g/main"
  mv "$g/main/tandem-gpu-bench" "$g/"
  strip -o "$g/engine-tests" "$(engine_tests "$d" hcalls)"
  git -C "$d" apply "$ROOT/$patch"
  cp -r "$d/engine/src/cuda/kernels" "$g/new/"
  xz -T2 -6 "$g/tandem-gpu-bench" "$g/engine-tests"
}

for w in $WHICH; do
  case $w in
    8)
      # old: 28df44d (before the large-batch decode kernels); patched: this checkout.
      rm -rf .gpu8 && mkdir -p .gpu8/old .gpu8/patched
      d=$(worktree b256old 28df44d)
      build "$d" b256old --features cuda -p tandem-engine --bin tandem-gpu-bench
      cp "$(rel b256old)/tandem-gpu-bench" .gpu8/old/ && cp -r "$d/engine/src/cuda/kernels" .gpu8/old/
      build "$ROOT" head --features cuda -p tandem-engine --bin tandem-gpu-bench
      cp "$(engine_tests "$ROOT" head)" .gpu8/patched/engine-tests
      cp "$(rel head)/tandem-gpu-bench" .gpu8/patched/ && cp -r engine/src/cuda/kernels .gpu8/patched/
      cp docs/gpu-results/2026-12-04-h200-async/call-3.sh .gpu8/
      strip .gpu8/old/tandem-gpu-bench .gpu8/patched/tandem-gpu-bench .gpu8/patched/engine-tests
      ;;
    9)
      rm -rf .gpu9 && mkdir -p .gpu9/c
      build "$ROOT" head --features cuda -p tandem --bin tandem
      strip -o .gpu9/c/tandem "$(rel head)/tandem" && xz -T2 -6 .gpu9/c/tandem
      cp -r cluster-configs/gpu-1p1d .gpu9/c/ && cp -r engine/src/cuda/kernels .gpu9/c/
      ;;
    10)
      rm -rf .gpu10 && mkdir -p .gpu10
      build "$ROOT" head -p tandem-kv-transfer --bin kv_bench
      strip -o .gpu10/kv_bench_new "$(rel head)/kv_bench"
      for pair in old:ff5b012 zc:8b4e76d; do
        name=${pair%%:*}
        d=$(worktree "kv$name" "${pair#*:}")
        build "$d" "kv$name" -p tandem-kv-transfer --bin kv_bench
        strip -o ".gpu10/kv_bench_$name" "$(rel "kv$name")/kv_bench"
      done
      ;;
    12)
      rm -rf .gpu12 && mkdir -p .gpu12
      build "$ROOT" head --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu12/tandem-gpu-bench "$(rel head)/tandem-gpu-bench"
      cp scripts/hf_reference.py .gpu12/
      ;;
    13)
      rm -rf .gpu13 && mkdir -p .gpu13
      build "$ROOT" head --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu13/tandem-gpu-bench "$(rel head)/tandem-gpu-bench"
      strip -o .gpu13/engine-tests "$(engine_tests "$ROOT" head)"
      xz -T2 -6 .gpu13/tandem-gpu-bench .gpu13/engine-tests
      cp -r engine/src/cuda/kernels .gpu13/ && cp scripts/hf_reference.py .gpu13/
      ;;
    14)
      rm -rf .gpu14 && mkdir -p .gpu14/main
      build "$ROOT" head --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu14/main/tandem-gpu-bench "$(rel head)/tandem-gpu-bench"
      cp -r engine/src/cuda/kernels .gpu14/main/
      xz -T2 -6 .gpu14/main/tandem-gpu-bench
      ;;
    15)
      rm -rf .gpu15 && mkdir -p .gpu15
      strip -o .gpu15/engine-tests "$(engine_tests "$ROOT" head)"
      xz -T2 -6 .gpu15/engine-tests
      ;;
    17 | 18)
      # 17: 53eef88 with gemv-rope-kv.patch; 18: with gemv-add-rmsnorm.patch after it.
      patches=docs/gpu-results/2026-12-05-tenth/gemv-rope-kv.patch
      if [ "$w" = 18 ]; then patches="$patches docs/gpu-results/2026-12-05-tenth/gemv-add-rmsnorm.patch"; fi
      rm -rf ".gpu$w" && mkdir -p ".gpu$w"
      d=$(worktree "fused$w" 53eef88 "$patches")
      build "$d" "fused$w" --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o ".gpu$w/tandem-gpu-bench" "$(rel "fused$w")/tandem-gpu-bench"
      strip -o ".gpu$w/engine-tests" "$(engine_tests "$d" "fused$w")"
      cp -r "$d/engine/src/cuda/kernels" ".gpu$w/"
      xz -T2 -6 ".gpu$w/tandem-gpu-bench" ".gpu$w/engine-tests"
      ;;
    19)
      rm -rf .gpu19 && mkdir -p .gpu19
      d=$(worktree prefetch 48811f9)
      build "$d" prefetch --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu19/tandem-gpu-bench "$(rel prefetch)/tandem-gpu-bench"
      strip -o .gpu19/engine-tests "$(engine_tests "$d" prefetch)"
      xz -T2 -6 .gpu19/tandem-gpu-bench .gpu19/engine-tests
      cp -r "$d/engine/src/cuda/kernels" .gpu19/
      ;;
    20)
      rm -rf .gpu20 && mkdir -p .gpu20
      d=$(worktree norm2 4a40548 docs/gpu-results/2026-12-06-eleventh/gemv-add-rmsnorm-v2.patch)
      build "$d" norm2 --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu20/tandem-gpu-bench "$(rel norm2)/tandem-gpu-bench"
      strip -o .gpu20/engine-tests "$(engine_tests "$d" norm2)"
      xz -T2 -6 .gpu20/tandem-gpu-bench .gpu20/engine-tests
      cp -r "$d/engine/src/cuda/kernels" .gpu20/
      ;;
    21)
      rm -rf .gpu21 && mkdir -p .gpu21
      d=$(worktree tune1 cf4f676)
      build "$d" tune1 --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu21/tandem-gpu-bench "$(rel tune1)/tandem-gpu-bench"
      strip -o .gpu21/engine-tests "$(engine_tests "$d" tune1)"
      xz -T2 -6 .gpu21/tandem-gpu-bench .gpu21/engine-tests
      cp -r engine/src/cuda/kernels .gpu21/
      ;;
    22)
      rm -rf .gpu22 && mkdir -p .gpu22
      d=$(worktree tune2 ef57e95)
      build "$d" tune2 --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu22/tandem-gpu-bench "$(rel tune2)/tandem-gpu-bench"
      strip -o .gpu22/engine-tests "$(engine_tests "$d" tune2)"
      xz -T2 -6 .gpu22/tandem-gpu-bench .gpu22/engine-tests
      cp -r "$d/engine/src/cuda/kernels" .gpu22/ && cp scripts/hf_reference.py .gpu22/
      ;;
    23)
      # main/: b064a30; silu/: the same with silu-unrolled.patch (call-11).
      rm -rf .gpu23 && mkdir -p .gpu23/main .gpu23/silu
      d=$(worktree silumain b064a30)
      build "$d" silumain --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu23/main/tandem-gpu-bench "$(rel silumain)/tandem-gpu-bench"
      cp -r "$d/engine/src/cuda/kernels" .gpu23/main/
      d=$(worktree silu b064a30 docs/gpu-results/2026-12-06-twelfth/silu-unrolled.patch)
      build "$d" silu --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu23/silu/tandem-gpu-bench "$(rel silu)/tandem-gpu-bench"
      strip -o .gpu23/silu/engine-tests "$(engine_tests "$d" silu)"
      cp -r "$d/engine/src/cuda/kernels" .gpu23/silu/
      # resid/: 01b5f31 with residual-epilogue.patch.
      mkdir -p .gpu23/resid
      d=$(worktree resid 01b5f31 docs/gpu-results/2026-12-06-twelfth/residual-epilogue.patch)
      build "$d" resid --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu23/resid/tandem-gpu-bench "$(rel resid)/tandem-gpu-bench"
      strip -o .gpu23/resid/engine-tests "$(engine_tests "$d" resid)"
      cp -r "$d/engine/src/cuda/kernels" .gpu23/resid/
      xz -T2 -6 .gpu23/main/tandem-gpu-bench .gpu23/silu/tandem-gpu-bench .gpu23/silu/engine-tests \
        .gpu23/resid/tandem-gpu-bench .gpu23/resid/engine-tests
      cp scripts/hf_reference.py .gpu23/
      ;;
    27)
      # main/: 7f94132; bk128/: the same with prefill-bk128-lanes.patch (landed in
      # e9ca8cc); lanes64/: the patch's kernel source with main's 64-key tiles and 4
      # stages, for main's binary (call-17, call-18, call-19, call-20).
      rm -rf .gpu27 && mkdir -p .gpu27/main .gpu27/bk128 .gpu27/lanes64 .gpu27/nofence .gpu27/pairs
      m=$(worktree main27 7f94132)
      bench_into "$m" main27 .gpu27/main
      d=$(worktree bk128 7f94132 docs/gpu-results/2026-12-06-thirteenth/prefill-bk128-lanes.patch)
      bench_into "$d" bk128 .gpu27/bk128
      cp -r "$d/engine/src/cuda/kernels" .gpu27/lanes64/
      { printf '#define PREFILL_WS_BK 64\n#define PREFILL_FP8_STAGES PREFILL_STAGES\n'
        cat "$d/engine/src/cuda/kernels/prefill_attn.cu"; } > .gpu27/lanes64/kernels/prefill_attn.cu
      # nofence/: main's kernels with prefill-tma-nofence.patch (kernels only).
      cp -r "$m/engine/src/cuda/kernels" .gpu27/nofence/
      d=$(worktree nofence 7f94132 docs/gpu-results/2026-12-06-thirteenth/prefill-tma-nofence.patch)
      cp "$d/engine/src/cuda/kernels/prefill_attn.cu" .gpu27/nofence/kernels/
      # pairs/: 7f94132 with prefill-tma-pairs.patch (call-20).
      d=$(worktree pairs 7f94132 docs/gpu-results/2026-12-06-thirteenth/prefill-tma-pairs.patch)
      bench_into "$d" pairs .gpu27/pairs
      strip -o .gpu27/pairs/engine-tests "$(engine_tests "$d" pairs)"
      xz -T2 -6 .gpu27/main/tandem-gpu-bench .gpu27/bk128/tandem-gpu-bench \
        .gpu27/pairs/tandem-gpu-bench .gpu27/pairs/engine-tests
      cp scripts/hf_reference.py .gpu27/
      ;;
    28)
      # main/: this checkout, with the tandem binary for gpu_1p1d_smoke.sh (call-21).
      rm -rf .gpu28 && mkdir -p .gpu28/main
      bench_into "$ROOT" head .gpu28/main
      build "$ROOT" head --features cuda -p tandem --bin tandem
      strip -o .gpu28/main/tandem "$(rel head)/tandem"
      strip -o .gpu28/main/engine-tests "$(engine_tests "$ROOT" head)"
      cp -r cluster-configs/gpu-1p1d .gpu28/main/
      xz -T2 -6 .gpu28/main/tandem-gpu-bench .gpu28/main/tandem .gpu28/main/engine-tests
      cp scripts/hf_reference.py .gpu28/
      ;;
    29)
      # main/: 256e400, before the patch landed; tune/: the same with tune-at-start.patch
      # (call-22).
      rm -rf .gpu29 && mkdir -p .gpu29/main .gpu29/tune
      m=$(worktree t29main 256e400)
      bench_into "$m" t29main .gpu29/main
      d=$(worktree tune 256e400 docs/gpu-results/2026-12-06-fourteenth/tune-at-start.patch)
      bench_into "$d" tune .gpu29/tune
      build "$d" tune --features cuda -p tandem --bin tandem
      strip -o .gpu29/tune/tandem "$(rel tune)/tandem"
      strip -o .gpu29/tune/engine-tests "$(engine_tests "$d" tune)"
      cp -r "$d/cluster-configs/gpu-1p1d" .gpu29/tune/
      xz -T2 -6 .gpu29/main/tandem-gpu-bench .gpu29/tune/tandem-gpu-bench .gpu29/tune/tandem \
        .gpu29/tune/engine-tests
      cp scripts/hf_reference.py .gpu29/
      ;;
    30)
      # 32dcca8's tandem-gpu-bench and engine-tests; k/main, k/A, k/B: its kernels,
      # with prefill-wait-after-softmax.patch, and with prefill-fence-copies-only.patch
      # after it (call-25, sixteenth session: neither faster, both dropped; the kernels'
      # signatures are the same, so one binary runs all three through
      # TANDEM_CUDA_KERNELS).
      rm -rf .gpu30 && mkdir -p .gpu30/k
      m=$(worktree t30main 32dcca8)
      build "$m" t30main --features cuda -p tandem-engine --bin tandem-gpu-bench
      strip -o .gpu30/tandem-gpu-bench "$(rel t30main)/tandem-gpu-bench"
      strip -o .gpu30/engine-tests "$(engine_tests "$m" t30main)"
      cp -r "$m/engine/src/cuda/kernels" .gpu30/k/main
      d=$(worktree t30 32dcca8 docs/gpu-results/2026-12-06-fifteenth/prefill-wait-after-softmax.patch)
      cp -r "$d/engine/src/cuda/kernels" .gpu30/k/A
      git -C "$d" apply "$ROOT/docs/gpu-results/2026-12-06-fifteenth/prefill-fence-copies-only.patch"
      cp -r "$d/engine/src/cuda/kernels" .gpu30/k/B
      # k/U: 7e67fc5's kernels, the uniform wgmma descriptors (calls 28-30).
      mkdir -p .gpu30/k/U && git archive 7e67fc5 engine/src/cuda/kernels |
        tar -x -C .gpu30/k/U --strip-components=4
      xz -T2 -6 .gpu30/tandem-gpu-bench .gpu30/engine-tests
      cp scripts/hf_reference.py .gpu30/
      ;;
    31)
      # main/: dc49b29's tandem-gpu-bench and kernels; split/: the same with
      # gemm-split-k-variants.patch, and its engine-tests (call-26, sixteenth session:
      # no split-K variant was kept; dropped).
      rm -rf .gpu31 && mkdir -p .gpu31/main .gpu31/split
      m=$(worktree t31main dc49b29)
      bench_into "$m" t31main .gpu31/main
      d=$(worktree split dc49b29 docs/gpu-results/2026-12-06-fifteenth/gemm-split-k-variants.patch)
      bench_into "$d" split .gpu31/split
      strip -o .gpu31/split/engine-tests "$(engine_tests "$d" split)"
      xz -T2 -6 .gpu31/main/tandem-gpu-bench .gpu31/split/tandem-gpu-bench \
        .gpu31/split/engine-tests
      ;;
    32)
      # tiles/: 7e67fc5 with gemm-tile-variants.patch: tandem-gpu-bench, its kernels and
      # engine-tests (call-31; TANDEM_CUDA_GEMM_TILE_VARIANTS=0 turns the variants off,
      # so one binary times both).
      rm -rf .gpu32 && mkdir -p .gpu32/tiles
      d=$(worktree tiles 7e67fc5 docs/gpu-results/2026-12-06-fifteenth/gemm-tile-variants.patch)
      bench_into "$d" tiles .gpu32/tiles
      strip -o .gpu32/tiles/engine-tests "$(engine_tests "$d" tiles)"
      xz -T2 -6 .gpu32/tiles/tandem-gpu-bench .gpu32/tiles/engine-tests
      ;;
    33)
      # main/: 7e67fc5's tandem-gpu-bench and kernels; norm/: the same with
      # norm-rows-in-registers.patch, and its engine-tests (call-33).
      rm -rf .gpu33 && mkdir -p .gpu33/main .gpu33/norm
      m=$(worktree t33main 7e67fc5)
      bench_into "$m" t33main .gpu33/main
      d=$(worktree norm 7e67fc5 docs/gpu-results/2026-12-06-fifteenth/norm-rows-in-registers.patch)
      bench_into "$d" norm .gpu33/norm
      strip -o .gpu33/norm/engine-tests "$(engine_tests "$d" norm)"
      xz -T2 -6 .gpu33/main/tandem-gpu-bench .gpu33/norm/tandem-gpu-bench .gpu33/norm/engine-tests
      ;;
    h)
      # The calls still waiting for an H200, from this checkout (nineteenth session):
      # .gpu30 (tandem-gpu-bench.xz, k/U = its kernels, scripts/hf_reference.py) for
      # call-32 and call-30, and .gpu35 (the same binary and kernels) for call-35.
      # (Until the nineteenth session this case also built calls 31 and 33's folders,
      # whose patches no longer apply; case 32 and 33 build them from 7e67fc5.)
      rm -rf .gpu30 .gpu35 && mkdir -p .gpu30/k .gpu35
      d=$(worktree hcalls HEAD)
      bench_into "$d" hcalls .gpu35
      cp .gpu35/tandem-gpu-bench .gpu30/ && cp -r .gpu35/kernels .gpu30/k/U
      xz -T2 -6 .gpu30/tandem-gpu-bench .gpu35/tandem-gpu-bench
      cp scripts/hf_reference.py .gpu30/
      du -sh .gpu30 .gpu35
      continue
      ;;
    36)
      # new/: 7cefa77's tandem-gpu-bench, engine-tests and kernels (calls 36-37).
      rm -rf .gpu36 && mkdir -p .gpu36/new
      d=$(worktree hcalls 7cefa77)
      bench_into "$d" hcalls .gpu36/new
      strip -o .gpu36/new/engine-tests "$(engine_tests "$d" hcalls)"
      xz -T2 -6 .gpu36/new/tandem-gpu-bench .gpu36/new/engine-tests
      ;;
    39)
      kernels_patch_folder .gpu39 docs/gpu-results/2026-12-06-nineteenth/decode-attn-table-smem.patch
      ;;
    41)
      kernels_patch_folder .gpu41 docs/gpu-results/2026-12-06-twenty-first/decode-tile-one-block.patch
      ;;
    42)
      rm -rf .gpu42 && mkdir -p .gpu42
      d=$(worktree h42 30b2ea6)
      bench_into "$d" h42 .gpu42
      strip -o .gpu42/engine-tests "$(engine_tests "$d" h42)"
      cp -r .gpu42/kernels .gpu42/kernels-tile
      git -C "$d" apply "$ROOT/docs/gpu-results/2026-12-06-twenty-first/decode-tile-one-block.patch"
      cp "$d/engine/src/cuda/kernels/decode_attn.cu" .gpu42/kernels-tile/
      xz -T2 -6 .gpu42/tandem-gpu-bench .gpu42/engine-tests
      ;;
    46)
      rm -rf .gpu46 && mkdir -p .gpu46
      d=$(worktree h46 d0eb820)
      bench_into "$d" h46 .gpu46
      strip -o .gpu46/engine-tests "$(engine_tests "$d" h46)"
      xz -T2 -6 .gpu46/tandem-gpu-bench .gpu46/engine-tests
      ;;
    47)
      rm -rf .gpu47 && mkdir -p .gpu47
      d=$(worktree h47 d0eb820 docs/gpu-results/2026-12-07-twenty-third/prefill-heads-fastest.patch)
      bench_into "$d" h47 .gpu47
      strip -o .gpu47/engine-tests "$(engine_tests "$d" h47)"
      xz -T2 -6 .gpu47/tandem-gpu-bench .gpu47/engine-tests
      git -C "$d" apply "$ROOT/docs/gpu-results/2026-12-07-twenty-third/rope-kv-wide.patch"
      cp -r "$d/engine/src/cuda/kernels" .gpu47/kernels-both
      git -C "$d" checkout -q d0eb820 -- engine/src/cuda/kernels/prefill_attn.cu
      cp -r "$d/engine/src/cuda/kernels" .gpu47/kernels-rope
      ;;
    55)
      rm -rf .gpu55 && mkdir -p .gpu55
      d=$(worktree head a3fc187)
      bench_into "$d" head .gpu55
      strip -o .gpu55/engine-tests "$(engine_tests "$d" head)"
      cp "$d/scripts/hf_reference.py" .gpu55/
      xz -T2 -6 .gpu55/tandem-gpu-bench .gpu55/engine-tests
      ;;
    48)
      rm -rf .gpu48 && mkdir -p .gpu48
      d=$(worktree h48 384755e)
      bench_into "$d" h48 .gpu48
      xz -T2 -6 .gpu48/tandem-gpu-bench
      ;;
    58)
      # old/ (6bd5912: KV blocks for prompt + max_tokens at admission) and new/ (f72def5:
      # blocks as sequences grow, preemption) tandem builds, one worktree after the other in
      # one target directory; the gpu-1p1d configs.
      rm -rf .gpu58 && mkdir -p .gpu58/old .gpu58/new .gpu58/next
      for pair in new:f72def5 old:6bd5912 next:b21fc0e; do
        d=$(worktree head "${pair#*:}")
        build "$d" head --features cuda -p tandem --bin tandem
        strip -o ".gpu58/${pair%%:*}/tandem" "$(rel head)/tandem"
      done
      cp -r cluster-configs/gpu-1p1d .gpu58/
      xz -T2 -6 .gpu58/old/tandem .gpu58/new/tandem .gpu58/next/tandem
      ;;
    67|68)
      # 7c2deb7's (67: decode streams always ranked high, env toggle) or ec50ce0's (68:
      # decode.gpu_priority) tandem and the gpu-1p1d configs; 67 also its engine tests.
      rev=7c2deb7; [ "$w" = 68 ] && rev=ec50ce0
      rm -rf ".gpu$w" && mkdir -p ".gpu$w"
      d=$(worktree "h$w" "$rev")
      build "$d" "h$w" --features cuda -p tandem --bin tandem
      strip -o ".gpu$w/tandem" "$(rel "h$w")/tandem"
      cp -r cluster-configs/gpu-1p1d ".gpu$w/"
      if [ "$w" = 67 ]; then
        strip -o .gpu67/engine-tests "$(engine_tests "$d" "h$w")"
        xz -T2 -6 .gpu67/engine-tests
      fi
      xz -T2 -6 ".gpu$w/tandem"
      ;;
    61)
      # 2553a5e's tandem (this session's main) and the gpu-1p1d configs, for call-61.
      rm -rf .gpu61 && mkdir -p .gpu61
      d=$(worktree head 2553a5e)
      build "$d" head --features cuda -p tandem --bin tandem
      strip -o .gpu61/tandem "$(rel head)/tandem"
      cp -r cluster-configs/gpu-1p1d .gpu61/
      xz -T2 -6 .gpu61/tandem
      ;;
    60)
      rm -rf .gpu60 && mkdir -p .gpu60
      for pair in main:35bedb3 zc:461b630 lanes:461b630; do
        name=${pair%%:*}
        patch=""; [ "$name" = lanes ] && patch=docs/gpu-results/2026-12-07-twenty-third/kv-lanes.patch
        d=$(worktree "kv$name" "${pair#*:}" "$patch")
        build "$d" "kv$name" -p tandem-kv-transfer --bin kv_bench
        strip -o ".gpu60/kv_bench_$name" "$(rel "kv$name")/kv_bench"
      done
      xz -T2 -6 .gpu60/kv_bench_main .gpu60/kv_bench_zc .gpu60/kv_bench_lanes
      ;;
    70)
      rm -rf .gpu70 && mkdir -p .gpu70
      for name in ring awslc; do
        patch=""; [ "$name" = awslc ] && patch=docs/cpu-results/2026-12-07-aws-lc/kv-awslc.patch
        d=$(worktree "kv$name" c6efb50 "$patch")
        build "$d" "kv$name" -p tandem-kv-transfer --bin kv_bench
        strip -o ".gpu70/kv_bench_$name" "$(rel "kv$name")/kv_bench"
      done
      xz -T2 -6 .gpu70/kv_bench_ring .gpu70/kv_bench_awslc
      ;;
    71)
      rm -rf .gpu71 && mkdir -p .gpu71
      d=$(worktree h71 e29da65)
      build "$d" h71 --features cuda -p tandem --bin tandem
      strip -o .gpu71/tandem "$(rel h71)/tandem"
      strip -o .gpu71/engine-tests "$(engine_tests "$d" h71)"
      cp -r cluster-configs/gpu-1p1d .gpu71/
      xz -T2 -6 .gpu71/tandem .gpu71/engine-tests
      ;;
    72)
      rm -rf .gpu72 && mkdir -p .gpu72
      d=$(worktree h72 2efd84e)
      bench_into "$d" h72 .gpu72
      build "$d" h72 --features cuda -p tandem --bin tandem
      strip -o .gpu72/tandem "$(rel h72)/tandem"
      strip -o .gpu72/engine-tests "$(engine_tests "$d" h72)"
      cp "$d/scripts/hf_reference.py" .gpu72/
      cp -r "$d/cluster-configs/gpu-1p1d" .gpu72/
      xz -T2 -6 .gpu72/tandem-gpu-bench .gpu72/tandem .gpu72/engine-tests
      ;;
    34)
      # main/ and new/ (norm-many-rows.patch) from one worktree and target directory.
      rm -rf .gpu34 && mkdir -p .gpu34/main .gpu34/new
      d=$(worktree hcalls 7f960c0)
      bench_into "$d" hcalls .gpu34/main
      git -C "$d" apply "$ROOT/docs/gpu-results/2026-12-06-eighteenth/norm-many-rows.patch"
      bench_into "$d" hcalls .gpu34/new
      strip -o .gpu34/new/engine-tests "$(engine_tests "$d" hcalls)"
      xz -T2 -6 .gpu34/main/tandem-gpu-bench .gpu34/new/tandem-gpu-bench .gpu34/new/engine-tests
      ;;
    *) echo "unknown folder $w (8 to 34, 36, 39, h)" >&2; exit 1 ;;
  esac
  du -sh ".gpu$w"
done
EXCLUDE=$(git rev-parse --git-common-dir)/info/exclude
grep -qxF "/.gpu*/" "$EXCLUDE" 2>/dev/null || echo "/.gpu*/" >> "$EXCLUDE"
